"""The scale study (issue 16): tiny sizes, every table, the exponent and the figures."""

import numpy as np
import pandas as pd
import pytest

from scvi_ext.benchmark import STUDIES, run_study
from scvi_ext.benchmark._scale import ddp_table, scaling_exponents, simulated_files

TINY = {
    "sizes": (400, 800),
    "n_genes": 50,
    "methods": ("scnym", "gmvae"),
    "storages": ("memory", "backed", "collection"),
    "ddp": False,
    "epochs": 2,
    "torch_threads": 1,
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("scale")
    return outdir, run_study("scale", [0], outdir, options=TINY)


def test_scale_is_a_study():
    assert "scale" in STUDIES


def test_scale_tables(tiny_run):
    outdir, tables = tiny_run
    assert set(tables) == {"scale", "scaling", "disk_vs_memory"}  # no scANVI, no DDP rows
    scale = tables["scale"]
    assert scale.columns[0] == "measurement"
    assert len(scale) == 2 * 2 * 3  # sizes x methods x storages
    assert (scale["error"] == "").all(), scale["error"].tolist()
    assert set(scale["storage"]) == {"memory", "backed", "collection"}
    assert (scale["torch_threads"] == 1).all()
    for column in (
        "seconds_per_epoch",
        "cpu_seconds_per_epoch",
        "train_cells_per_second",
        "train_cells_per_cpu_second",
        "predict_cells_per_second",
        "predict_cells_per_cpu_second",
        "peak_rss_train_gb",
        "peak_rss_predict_gb",
        "first_epoch_seconds",
        "later_seconds_per_epoch",
        "later_train_cells_per_second",
    ):
        assert (scale[column] > 0).all(), column
    # two epochs: the first and the later one make up the mean
    halves = (scale["first_epoch_seconds"] + scale["later_seconds_per_epoch"]) / 2
    assert np.allclose(halves, scale["seconds_per_epoch"])
    # a process that imported scvi-tools holds hundreds of MB, and far less than the machine
    assert scale["peak_rss_train_gb"].between(0.2, 8).all()

    scaling = tables["scaling"]
    assert list(scaling["model_storage"]) == [
        "scnym / memory",
        "gmvae / memory",
        "scnym / backed",
        "gmvae / backed",
        "scnym / collection",
        "gmvae / collection",
    ]
    assert np.isfinite(scaling[["time_exponent", "cpu_time_exponent"]]).all().all()
    assert np.allclose(scaling["x10_cells_time_factor"], 10 ** scaling["time_exponent"])
    assert (scaling["n_sizes"] == 2).all() and (scaling["largest_n"] == 800).all()

    disk = tables["disk_vs_memory"]
    assert len(disk) == 2 * 2 * 2  # methods x sizes x (backed, collection) vs memory
    for column in ("train", "later_train", "train_cpu", "predict", "predict_cpu"):
        assert (disk[f"{column}_throughput_pct"] > 0).all(), column

    for name in ("scale_per_seed.csv", "scaling_per_seed.csv", "scale_loglog_seed0.png"):
        assert (outdir / name).stat().st_size > 0, name
    assert "## scaling" in (outdir / "summary.md").read_text()


def test_scale_reuses_files_and_measurements(tiny_run):
    outdir, tables = tiny_run
    files = simulated_files(400, 50, 0, outdir / "data")
    assert files["h5ad"].name == "simulated_400x50_seed0.h5ad"
    assert not list((outdir / "data").glob("*partial*"))
    options = {**TINY, "sizes": (400, 1600), "reuse_only": True}
    again = run_study("scale", [0], outdir, options=options)["scale"].set_index("measurement")
    reused = again[again["n_cells"] == 400]
    first = tables["scale"].set_index("measurement").loc[reused.index]
    assert np.allclose(reused["seconds_per_epoch"], first["seconds_per_epoch"])
    missing = again[again["n_cells"] == 1600]
    assert len(missing) == 6 and (missing["error"] == "not measured (reuse_only)").all()
    assert missing["seconds_per_epoch"].isna().all()
    assert not list((outdir / "data").glob("simulated_1600x*"))  # nothing written


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("storages", ("memory", "disk"), "Unknown storage(s) ['disk']; choose among ['memory'"),
        ("methods", "scvi", "Unknown method(s) ['scvi']; choose among ['scnym'"),
        ("accelerator", "gpus", "Unknown accelerator ['gpus']; choose among ['cpu', 'gpu'"),
        ("precision", "bf16", "Unknown precision ['bf16']; choose among ['32-true', 'bf16-mixed'"),
    ],
)
def test_scale_refuses_unknown_choices(tmp_path, option, value, message):
    with pytest.raises(ValueError) as error:
        run_study("scale", [0], tmp_path, options={**TINY, option: value})
    assert message in str(error.value)
    assert not (tmp_path / "data").exists()  # refused before writing anything


def test_scaling_exponent_of_known_times():
    n = np.array([1e4, 1e5, 1e6])
    table = pd.DataFrame(
        {
            "method": ["m"] * 3 + ["q"] * 3,
            "storage": "backed",
            "n_cells": np.tile(n, 2),
            "processes": 1,
            "seconds_per_epoch": np.concatenate([2e-3 * n, 5e-8 * n**1.5]),
            "peak_rss_train_gb": np.concatenate([np.full(3, 1.0), 1e-3 * n**0.5]),
        }
    )
    exponents = scaling_exponents(table).set_index("model_storage")
    assert exponents.loc["m / backed", "time_exponent"] == pytest.approx(1.0)
    assert exponents.loc["q / backed", "time_exponent"] == pytest.approx(1.5)
    assert exponents.loc["q / backed", "x10_cells_time_factor"] == pytest.approx(10**1.5)
    assert exponents.loc["m / backed", "peak_rss_exponent"] == pytest.approx(0.0, abs=1e-9)
    assert exponents.loc["q / backed", "peak_rss_exponent"] == pytest.approx(0.5)


def _measurements(method, processes, seconds, device, precision):
    return {
        "method": method,
        "storage": "backed",
        "n_cells": 1000,
        "processes": processes,
        "seconds_per_epoch": seconds,
        "cpu_seconds_per_epoch": seconds / 2,
        "peak_rss_train_gb": 1.0,
        "device": device,
        "precision": precision,
    }


def test_ddp_compares_only_runs_on_the_same_device_and_precision():
    table = pd.DataFrame(
        [
            _measurements("scnym", 1, 1.0, "cuda:0", "bf16-mixed"),  # GPU one-process run
            _measurements("scnym", 2, 10.0, "cpu", ""),
            _measurements("gmvae", 1, 6.0, "cpu", ""),
            _measurements("gmvae", 2, 3.0, "cpu", ""),
        ]
    )
    ddp = ddp_table(table).set_index("comparison")
    like = ddp.loc["gmvae / backed / n=1000"]
    assert like["speedup"] == pytest.approx(2.0)
    assert like["seconds_per_epoch_1"] == 6.0 and like["cpu_seconds_per_epoch_1"] == 3.0
    assert (like["device"], like["precision"], like["note"]) == ("cpu", "32-true", "")
    unlike = ddp.loc["scnym / backed / n=1000"]
    assert np.isnan(unlike["speedup"]) and np.isnan(unlike["seconds_per_epoch_1"])
    assert unlike["seconds_per_epoch_2"] == 10.0
    assert unlike["note"] == "1 proc on cuda:0 / bf16-mixed: not compared"


def test_ddp_takes_the_cpu_one_process_run_among_several():
    table = pd.DataFrame(
        [
            _measurements("scnym", 1, 1.0, "cpu", "bf16-mixed"),
            _measurements("scnym", 1, 8.0, "cpu", "32-true"),  # same as the default
            _measurements("scnym", 2, 4.0, "cpu", ""),
        ]
    )
    assert ddp_table(table)["speedup"].tolist() == [pytest.approx(2.0)]
    # measurements from before device and precision were recorded: CPU, 32-true
    old = table.drop(index=0, columns=["device", "precision"])
    assert ddp_table(old)["speedup"].tolist() == [pytest.approx(2.0)]


def test_a_bad_block_size_is_refused_before_anything_is_written(tmp_path):
    from scvi_ext.benchmark._scale import scale_study

    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        scale_study(0, tmp_path / "out", sizes=(400,), block_size=0)
    assert not (tmp_path / "out").exists()


def test_scale_measures_cgran_and_mixed_precision_when_asked(tmp_path):
    options = {**TINY, "sizes": (400,), "n_genes": 200, "methods": ("cgran",)}
    options["storages"] = ("memory",)
    options["precision"] = "bf16-mixed"
    scale = run_study("scale", [0], tmp_path, options=options)["scale"]
    assert len(scale) == 1 and scale["error"].tolist() == [""]
    assert scale["precision"].tolist() == ["bf16-mixed"]
    assert scale["device"].tolist() == ["cpu"]  # the default accelerator
    assert scale["train_cells_per_second"].iloc[0] > 0

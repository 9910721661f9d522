"""The latent_inputs study (issue 14): options and a tiny run through run_study."""

import numpy as np
import pandas as pd
import pytest
import scvi
from conftest import (
    assert_trained_with_plain_adam,
    record_trained_adam_eps,
    requires_shared_data,
)

from scvi_ext.benchmark import STUDIES, run_study
from scvi_ext.benchmark._latent_inputs import study_options


def test_options_default_to_the_full_study_and_take_single_values_as_tuples():
    full = study_options()
    assert full.ks == (10, 25, 50, 100) and full.fractions == (0.1, 0.25, 0.5, 1.0)
    assert full.datasets == (
        "snareseq_cell_type",
        "snareseq_cell_type_fine",
        "kang_donors",
        "kang_ifnb",
    )
    reduced = study_options(datasets="kang_ifnb", ks=(10, 50), fractions=[0.25, 1], epochs=30)
    assert reduced.datasets == ("kang_ifnb",) and reduced.ks == (10, 50)
    assert reduced.fractions == (0.25, 1) and reduced.epochs == 30


def test_unknown_options_and_choices_are_errors_that_name_them():
    with pytest.raises(ValueError, match=r"datasets: unknown \['pbmc'\]"):
        study_options(datasets="pbmc")
    with pytest.raises(ValueError, match=r"Unknown latent_inputs option\(s\) \['kss'\]"):
        study_options(kss=10)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        (
            "backends",
            "no",
            "latent_inputs backends must be True or False (default: True), not 'no'.",
        ),
        ("umap", 0, "latent_inputs umap must be True or False (default: True), not 0."),
        ("epochs", 2.5, "latent_inputs epochs must be an integer (default: 100), not 2.5."),
        ("epochs", True, "latent_inputs epochs must be an integer (default: 100), not True."),
        (
            "ks",
            (10, "50"),
            "latent_inputs ks must be an integer (default: (10, 25, 50, 100)), not '50'.",
        ),
        (
            "gmvae_lr",
            "1e-3",
            "latent_inputs gmvae_lr must be a number (default: 0.0001), not '1e-3'.",
        ),
    ],
)
def test_options_of_another_type_than_the_default_are_errors(option, value, message):
    with pytest.raises(ValueError) as error:
        study_options(**{option: value})
    assert str(error.value) == message


def test_integers_are_taken_for_float_options():
    assert study_options(gmvae_lr=1, fractions=(1,)).gmvae_lr == 1


@requires_shared_data
def test_tiny_run_writes_every_table_and_figure(tmp_path):
    options = dict(
        datasets="kang_ifnb",
        ks=4,
        fractions=0.5,
        epochs=2,
        classifier_epochs=2,
        n_hidden=16,
        n_components=4,
        gmvae_lr=1e-3,
        max_cells=200,
        umap=False,
    )
    tables = run_study("latent_inputs", seeds=[0], outdir=tmp_path, options=options)
    classification = tables["classification"]
    representations = {"log_hvg", "pca_k4", "gmvae_k4", "scvi_k4", "cellular_k4"}
    assert set(classification["representation"]) == representations
    assert len(classification) == len(representations) * 2  # two classifiers
    assert classification["accuracy"].between(0, 1).all()
    assert classification["train_accuracy"].between(0, 1).all()
    methods = set(tables["clustering"]["clustering"].str.split(" / ").str[1])
    assert {"gmvae_k4 predict_cluster", "scvi_k4 leiden", "pca_k4 leiden"} <= methods
    assert list(tables["backends"]["backend"]) == ["kang_ifnb / torch", "kang_ifnb / pyro"]
    assert (tables["speed"]["cells_per_second"] > 0).all()
    assert (tmp_path / "elbo_kang_ifnb_seed0.png").exists()
    assert (tmp_path / "classification.png").exists() and (tmp_path / "summary.md").exists()
    per_seed = pd.read_csv(tmp_path / "classification_per_seed.csv")
    assert len(per_seed) == len(classification)
    assert "latent_inputs" in STUDIES


@requires_shared_data
def test_former_eps_classifiers_run_side_by_side_and_without_gmvae_no_backends(
    tmp_path, monkeypatch
):
    from scvi_ext.classifier import LatentClassifier

    trained_eps = record_trained_adam_eps(monkeypatch, LatentClassifier)
    options = dict(
        datasets="kang_ifnb",
        ks=4,
        fractions=1.0,
        representations="pca",
        classifiers=("default", "default_eps1e-2", "seed_ffnn", "seed_ffnn_eps1e-2"),
        classifier_epochs=2,
        max_cells=200,
        umap=False,
    )
    tables = run_study("latent_inputs", seeds=[0], outdir=tmp_path, options=options)
    assert list(tables["classification"]["classifier"]) == list(options["classifiers"])
    assert trained_eps == [1e-8, 1e-2, 1e-8, 1e-2]
    assert tables["backends"].drop(columns="seed").empty  # GMVAE was not trained
    assert not (tmp_path / "backends_per_seed.csv").exists()
    assert "## backends" not in (tmp_path / "summary.md").read_text()


@requires_shared_data
def test_the_4x_epochs_classifier_trains_four_times_the_epochs_and_backends_can_be_skipped(
    tmp_path, monkeypatch
):
    from scvi_ext.classifier import LatentClassifier

    train, epochs_trained = LatentClassifier.train, []

    def recording_train(self, *args, **kwargs):
        out = train(self, *args, **kwargs)
        epochs_trained.append(self.trainer.current_epoch)
        return out

    monkeypatch.setattr(LatentClassifier, "train", recording_train)
    options = dict(
        datasets="kang_ifnb",
        ks=4,
        fractions=1.0,
        representations=("pca", "gmvae"),
        classifiers=("seed_ffnn", "seed_ffnn_4x_epochs"),
        epochs=1,
        classifier_epochs=2,
        n_hidden=16,
        n_components=4,
        max_cells=200,
        umap=False,
        backends=False,
    )
    tables = run_study("latent_inputs", seeds=[0], outdir=tmp_path, options=options)
    assert list(tables["classification"]["classifier"]) == list(options["classifiers"]) * 2
    assert epochs_trained == [2, 8, 2, 8]  # pca, then gmvae: the seed FFNN, then 4x
    assert tables["backends"].drop(columns="seed").empty  # GMVAE trained, backends skipped


def test_gmvae_components_options_name_unknown_variants():
    from scvi_ext.benchmark._gmvae_components import study_options as components_options

    assert components_options(variants="default").variants == ("default",)
    assert components_options().variants[-1] == "mog_prior"
    with pytest.raises(ValueError, match=r"gmvae_components variants: unknown \['free_bits'\]"):
        components_options(variants=("default", "free_bits"))


@requires_shared_data
def test_tiny_gmvae_components_run_counts_components_for_every_variant(tmp_path):
    options = dict(
        datasets="kang_ifnb",
        epochs=3,
        n_components=4,
        n_latent=4,
        n_hidden=16,
        lr=1e-3,
        kmeans_init_epoch=2,
        classifier_epochs=2,
        max_cells=200,
        record_every=1,
    )
    tables = run_study("gmvae_components", seeds=[0], outdir=tmp_path, options=options)
    runs = tables["components"].set_index("run")
    variants = ["default", "kl_warmup", "kmeans_init", "balance", "mixture_lr", "mog_prior"]
    assert list(runs.index) == [f"kang_ifnb / GMVAE {v}" for v in variants] + [
        "kang_ifnb / Leiden on scVI"
    ]
    gmvae = runs.iloc[:6]
    assert gmvae["components_used"].between(1, 4).all()
    assert (gmvae["components_over_1pct"] <= gmvae["components_used"]).all()
    assert gmvae["classifier_accuracy"].between(0, 1).all() and (gmvae["elbo"] < 0).all()
    curves = tables["components_vs_epoch"]
    assert sorted(set(curves["epoch"])) == [1, 2, 3] and len(curves) == 3 * 6
    mog = curves[curves["curve"].str.startswith("kang_ifnb / mog_prior / ")]
    assert mog["used"].between(1, 4).all()  # counted from MogPrior's p(y | z)
    assert (tmp_path / "components_vs_epoch_kang_ifnb_seed0.png").exists()


def test_seed_ffnn_trains_as_the_seed_plain_adam_every_epoch_last_weights():
    import anndata as ad

    from scvi_ext.benchmark._latent_inputs import SeedFFNNClassifier

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 200)
    features = rng.normal(size=(200, 5)).astype(np.float32) + labels[:, None]
    adata = ad.AnnData(
        obs=pd.DataFrame({"label": labels.astype(str)}, index=[f"c{i}" for i in range(200)]),
        obsm={"X_rep": features},
    )
    SeedFFNNClassifier.setup_anndata(adata, labels_key="label", obsm_key="X_rep")
    model = SeedFFNNClassifier(adata)
    model.train(max_epochs=12, enable_progress_bar=False)
    assert_trained_with_plain_adam(model, lr=1e-4)
    assert len(model.history["train_loss"]) == 12  # no early stopping
    scheduler = model.trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.get_last_lr() == [pytest.approx(1e-4, rel=1e-9)]  # a constant rate


def test_train_accuracy_is_the_classifiers_accuracy_on_its_own_training_cells():
    from scvi_ext.benchmark._latent_inputs import _classify

    rng = np.random.default_rng(0)
    labels = np.repeat(np.array(["a", "b", "c"]), 30)
    centres = {"a": 0.0, "b": 0.6, "c": 1.2}  # overlapping: not every cell is fitted
    cells = np.stack([rng.normal(centres[label], 1.0, size=5) for label in labels])
    cells = cells.astype(np.float32)
    scvi.settings.seed = 0
    scores = _classify("default", cells, labels, cells, labels, epochs=3)
    assert scores["train_accuracy"] == pytest.approx(scores["accuracy"])
    assert 1 / 3 < scores["train_accuracy"] < 1
    scvi.settings.seed = 0  # the same classifier, scored against other query labels
    shifted = _classify("default", cells, labels, cells, np.roll(labels, 30), epochs=3)
    assert shifted["train_accuracy"] == scores["train_accuracy"]
    assert shifted["accuracy"] != pytest.approx(scores["accuracy"])

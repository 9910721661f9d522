"""The matching studies (issue 15): snareseq_matching on the untrained methods, matching_scale."""

import numpy as np
import pytest
from conftest import requires_shared_data

from scvi_ext.benchmark import run_study


@requires_shared_data
def test_snareseq_matching_study_scores_the_untrained_methods_both_ways(tmp_path):
    tables = run_study(
        "snareseq_matching",
        seeds=[0],
        outdir=tmp_path,
        options={"methods": ("gene_activity_pca",), "plots": False},
    )
    matching = tables["matching"]
    assert set(matching["method"]) == {"gene_activity_pca"}
    assert set(matching["direction"]) == {"rna_to_atac", "atac_to_rna"}
    assert (matching["max_nonzeros_per_row"] <= 1000).all()
    n_held_out = 2062  # 20% of 10,309 cells
    without_assignment = matching[matching["assignment"] == "none"]
    assert set(matching["temperature_fit"]) == {"likelihood", "score"}
    score = without_assignment.set_index(["temperature_fit", "direction"])["competition_score"]
    assert (score["likelihood"] > 2 / n_held_out).all()  # random: 1 / n
    assert (score["score"] > 10 / n_held_out).all()  # sharper: higher competition score
    # on a model better than chance, the likelihood fit has the better log-likelihood
    log_likelihood = without_assignment.groupby("temperature_fit")["log_likelihood"].mean()
    assert log_likelihood["likelihood"] > log_likelihood["score"]
    assert log_likelihood["likelihood"] > np.log(1 / n_held_out)
    assert not list(tmp_path.glob("*_seed0.png"))  # plots=False


def test_random_baseline_scores_one_over_n_with_every_matching():
    from scvi_ext.benchmark._matching import MATCHING_METHODS, MATCHINGS
    from scvi_ext.metrics import matching_score

    n = 200
    output = MATCHING_METHODS["random"](None, None, np.arange(n), None, seed=0)
    assert len(output.matrices) == 2 * len(MATCHINGS)
    for key, matrix in output.matrices.items():
        assert matching_score(matrix) < 3 / n, key  # expected 1 / n
        np.testing.assert_allclose(matrix.sum(1).A1, 1.0, rtol=1e-5)


def test_similarity_figure_of_the_held_out_cells(tmp_path):
    import pandas as pd
    import scipy.sparse as sp

    from scvi_ext.benchmark._matching import MatchingOutput, _plots

    n = 30
    matrix = sp.csr_matrix(np.eye(n))
    output = MatchingOutput({("rna_to_atac", None, "likelihood"): matrix}, None, None, 0.0, {})
    obs = pd.DataFrame({"cell_type": np.repeat(["a", "b", "c"], 10)})
    _plots("toy", output, obs, seed=0, folder=tmp_path)
    assert [path.name for path in tmp_path.iterdir()] == ["toy_similarity_seed0.png"]


def test_matching_scale_study_memory_and_row_sums(monkeypatch):
    import scvi_ext.matching
    from scvi_ext.benchmark._matching import matching_scale

    row_sums = []
    match_embeddings = scvi_ext.matching.match_embeddings

    def spy(*args, **kwargs):
        matrix = match_embeddings(*args, **kwargs)
        row_sums.append(matrix.sum(1).A1)
        return matrix

    monkeypatch.setattr(scvi_ext.matching, "match_embeddings", spy)
    table = matching_scale(0, sizes=(1500, 3000))["scale"]
    assert list(table["n_cells"]) == [1500, 3000]
    assert (table["nonzeros"] == table["n_cells"] * 1000).all()
    assert (table["peak_mb"] > 0).all(), table
    assert (table["competition_score"] > 0.9).all(), table  # measured 0.99
    assert [len(sums) for sums in row_sums] == [1500, 3000]
    for sums in row_sums:
        np.testing.assert_allclose(sums, 1.0, rtol=1e-5)


def test_warm_started_matcher_method_gives_every_matching_with_both_temperature_fits():
    import torch

    from scvi_ext.benchmark._matching import DIRECTIONS, MATCHING_METHODS, MATCHINGS
    from scvi_ext.matching import simulate_paired

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        mdata = simulate_paired(n_cells=200)
        train, test = np.arange(160), np.arange(160, 200)
        run = MATCHING_METHODS["cross_attention_triplet_warm_local"]
        output = run(mdata, train, test, None, seed=0, epochs=4)
    finally:
        torch.set_num_threads(threads)
    model = output.model
    assert model.trainer.lightning_module.infonce_warmup_epochs == 1  # a quarter of 4 epochs
    assert set(output.matrices) == {
        (direction, assignment, fit) for direction in DIRECTIONS for assignment, fit in MATCHINGS
    }
    for matrix in output.matrices.values():
        assert matrix.shape == (40, 40)
        np.testing.assert_allclose(matrix.sum(1).A1, 1.0, rtol=1e-5)
    sharp = output.matrices["rna_to_atac", None, "score"]
    default = output.matrices["rna_to_atac", None, "likelihood"]
    expected = model.match(
        mdata[test].copy(), top_k=1000, temperature=model.match_temperatures_["score"]
    )
    np.testing.assert_allclose(sharp.toarray(), expected.toarray(), rtol=1e-5)
    assert model.match_temperatures_["score"] <= model.match_temperatures_["likelihood"]
    assert default.max() <= sharp.max()


@pytest.mark.parametrize(
    "name",
    [
        "clip_infonce_local_gene_activity",
        "clip_infonce_shared_gene_activity",
        "clip_infonce_shared_gene_activity_conv",
        "clip_infonce_shared_gene_activity_wide",
        "clip_linear_gene_activity",
        "cross_attention_triplet_warm_local_gene_activity",
    ],
)
def test_gene_activity_methods_read_atac_as_gene_activity(name):
    import scipy.sparse as sp

    from scvi_ext.benchmark._matching import MATCHING_METHODS
    from scvi_ext.matching import RegionTokenizer, simulate_paired

    mdata = simulate_paired(n_cells=120)
    peaks_gene = np.random.default_rng(0).integers(120, size=600)
    links = sp.csr_matrix((np.ones(600), (peaks_gene, np.arange(600))), shape=(120, 600))
    output = MATCHING_METHODS[name](mdata, np.arange(100), np.arange(100, 120), links, 0, epochs=1)
    assert output.model.module.atac_input == "gene_activity"
    assert output.model.module.shared_encoder == ("shared" in name or "linear" in name)
    module = output.model.module
    assert module.encoder == ("linear" if "linear" in name else "attention")
    conv = isinstance(getattr(module, "rna_tokenizer", None), RegionTokenizer)
    assert conv == name.endswith("_conv")
    assert output.matrices["rna_to_atac", None, "likelihood"].shape == (20, 20)


@pytest.mark.parametrize(
    ("name", "eps", "lr"),
    [
        ("clip_linear_gene_activity", 1e-2, 1e-3),
        ("clip_linear_gene_activity_eps1e-8", 1e-8, 1e-3),
        ("clip_linear_gene_activity_lr1e-4", 1e-2, 1e-4),
        ("cross_attention_triplet", 1e-2, 1e-3),
        ("cross_attention_triplet_eps1e-8", 1e-8, 1e-3),
    ],
)
def test_matcher_rows_train_with_their_adam_eps_and_lr(name, eps, lr):
    import scipy.sparse as sp

    from scvi_ext.benchmark._matching import MATCHING_METHODS
    from scvi_ext.matching import simulate_paired

    mdata = simulate_paired(n_cells=120)
    peaks_gene = np.random.default_rng(0).integers(120, size=600)
    links = sp.csr_matrix((np.ones(600), (peaks_gene, np.arange(600))), shape=(120, 600))
    output = MATCHING_METHODS[name](mdata, np.arange(100), np.arange(100, 120), links, 0, epochs=1)
    group = output.model.trainer.optimizers[0].param_groups[0]
    assert (group["eps"], group["lr"]) == (eps, lr)
    base_name = name.removesuffix("_eps1e-8").removesuffix("_lr1e-4")
    if base_name == name:  # a base row: nothing to compare it with
        return
    # a row with other plan arguments is its base row's model otherwise
    base = MATCHING_METHODS[base_name](
        mdata, np.arange(100), np.arange(100, 120), links, 0, epochs=1
    )

    def settings(model):
        return {
            k: v for k, v in model.init_params_["non_kwargs"].items() if k != "gene_region_map"
        }

    assert settings(output.model) == settings(base.model)

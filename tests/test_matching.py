"""CrossAttentionMatcher (issue 15): the contract's tests on paired RNA/ATAC MuData, the
matching utilities, and the bad inputs with their messages."""

import hashlib
import re

import mudata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import scvi
import torch
import torch.nn.functional as F
from anndata.abc import CSRDataset
from conftest import ddp_rank_results, requires_shared_data
from mudata import MuData
from scipy.optimize import linear_sum_assignment

from scvi_ext.base._sampler import is_on_disk
from scvi_ext.matching import (
    CrossAttentionMatcher,
    LocalTokenizer,
    MatcherTrainingPlan,
    RegionTokenizer,
    assign,
    bipartite_assignment,
    entropic_ot,
    fit_temperature,
    gene_genome_order,
    genome_order,
    match_embeddings,
    probabilities,
    simulate_paired,
    top_k_scores,
    true_pair_log_probabilities,
)
from scvi_ext.matching._assignment import TEMPERATURE_GRID
from scvi_ext.metrics import (
    matched_label_fraction,
    matching_log_likelihood,
    matching_score,
    matching_top_k,
)
from scvi_ext.model import CrossAttentionMatcher as ExportedMatcher

SMALL = {
    "embed_dim": 16,
    "n_heads": 2,
    "n_tokens_rna": 4,
    "n_tokens_atac": 8,
    "n_filters": 4,
    "kernel_size_atac": 8,
    "n_hard_candidates": 4,
    "tokenizer": "local",
    "n_rerank": 5,
}
FAST = {"max_epochs": 20, "batch_size": 64, "enable_progress_bar": False}


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """One torch thread: on a shared 2-core machine two threads per process run the small
    attention steps tens of times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(_one_torch_thread):
    """(model trained on 320 paired cells, training MuData, held-out MuData of 80 cells)."""
    scvi.settings.seed = 0
    mdata = simulate_paired()
    reference, held_out = mdata[:320].copy(), mdata[320:].copy()
    CrossAttentionMatcher.setup_mudata(reference, batch_key="rna:batch")
    model = CrossAttentionMatcher(reference, **SMALL)
    model.train(**FAST)
    return model, reference, held_out


def test_exported_as_scvi_ext_model():
    assert ExportedMatcher is CrossAttentionMatcher


def test_training_logs_loss_and_in_batch_accuracy_and_fits_idf_and_temperature(trained):
    model, reference, _ = trained
    for name in ("train_loss", "validation_loss", "train_top1_in_batch"):
        assert name in model.history, sorted(model.history)
    atac = reference.mod["atac"].X
    cells_with_peak = np.asarray((atac > 0).sum(0)).ravel()
    expected = np.log1p(reference.n_obs / (1.0 + cells_with_peak))
    np.testing.assert_allclose(model.module.peak_idf.numpy(), expected, rtol=1e-5)
    assert model.temperature_fit == "likelihood"
    assert set(model.match_temperatures_) == {"likelihood", "score"}
    assert model.match_temperature_ == model.match_temperatures_["likelihood"]
    assert set(model.match_temperatures_.values()) <= set(TEMPERATURE_GRID)


def test_held_out_matching_well_above_chance(trained):
    model, _, held_out = trained
    matrix = model.match(held_out.mod["rna"], held_out.mod["atac"], top_k=50)
    n = held_out.n_obs
    assert matching_score(matrix) > 2 / n  # chance: 1 / n
    # the likelihood-fitted temperature (default) beats chance (log 1/n) and the sharper
    # competition-score-fitted one on log-likelihood; the sharper one scores higher
    log_likelihood = matching_log_likelihood(matrix)
    sharp = model.match(held_out, top_k=50, temperature=model.match_temperatures_["score"])
    assert log_likelihood > np.log(1 / n) + 0.3 and log_likelihood > matching_log_likelihood(sharp)
    assert matching_score(sharp) > 4 / n
    assert matching_top_k(matrix, 5) > 3 * 5 / n
    types = held_out.mod["rna"].obs["cell_type"].to_numpy()
    assert matched_label_fraction(matrix, types, types) > 0.5  # chance: about 0.25


def test_match_rows_sum_to_one_with_at_most_top_k_per_row_on_queries_of_other_sizes(trained):
    model, _, held_out = trained
    rna, atac = held_out.mod["rna"][:37].copy(), held_out.mod["atac"][5:58].copy()
    matrix = model.match(rna, atac, top_k=10)
    assert sp.issparse(matrix) and matrix.shape == (37, 53)
    np.testing.assert_allclose(matrix.sum(1).A1, 1.0, rtol=1e-5)
    assert np.diff(matrix.indptr).max() <= 10
    reverse = model.match(rna, atac, top_k=10, rows="atac")
    assert reverse.shape == (53, 37)
    np.testing.assert_allclose(reverse.sum(1).A1, 1.0, rtol=1e-5)
    assert model.match(held_out, top_k=1000).shape == (held_out.n_obs, held_out.n_obs)


@pytest.mark.parametrize("modality", ["rna", "atac"])
def test_counts_log_transformed_after_setup_stop_training(modality):
    scvi.settings.seed = 0
    mdata = simulate_paired()[:120].copy()
    CrossAttentionMatcher.setup_mudata(mdata)
    model = CrossAttentionMatcher(mdata, **SMALL)
    counts = mdata.mod[modality].X
    counts.data[:] = np.log1p(counts.data)  # as sc.pp.log1p does, in place
    message = rf"mdata\.mod\['{modality}'\]\.X contains non-integer values; found \d+\. "
    with pytest.raises(ValueError, match=message + "This looks like normalised"):
        model.train(**FAST)


def test_one_to_one_assignments(trained, monkeypatch):
    model, _, held_out = trained
    bipartite = model.match(held_out, top_k=20, assignment="bipartite")
    np.testing.assert_array_equal(bipartite.sum(1).A1, 1.0)
    np.testing.assert_array_equal(bipartite.sum(0).A1, 1.0)  # a permutation
    assert set(np.unique(bipartite.data)) == {1.0}
    transport = model.match(held_out, top_k=20, assignment="ot")
    np.testing.assert_allclose(transport.sum(1).A1, 1.0, rtol=1e-6)
    full_support = model.match(held_out, top_k=held_out.n_obs, assignment="ot")
    np.testing.assert_allclose(full_support.sum(0).A1, 1.0, atol=1e-3)  # uniform marginals
    unknown = "assignment must be 'bipartite', 'ot' or None, not 'greedy'."
    monkeypatch.setattr(model, "_encode", lambda *args: pytest.fail("encoded the cells"))
    with pytest.raises(ValueError, match=re.escape(unknown)):  # before encoding the cells
        model.match(held_out, assignment="greedy")
    with pytest.raises(ValueError, match=re.escape(unknown)):
        match_embeddings(np.eye(3), np.eye(3), assignment="greedy")


def test_block_matching_equals_dense_and_reranking_changes_scores(trained):
    model, _, held_out = trained
    rna_embedding = model.get_latent_representation(held_out, modality="rna")
    atac_embedding = model.get_latent_representation(held_out, modality="atac")
    indices, scores = top_k_scores(rna_embedding, atac_embedding, top_k=7, block_size=3)
    dense_scores, dense_indices = torch.topk(
        torch.as_tensor(rna_embedding @ atac_embedding.T), 7, dim=1
    )
    np.testing.assert_allclose(scores, dense_scores.numpy(), rtol=1e-5)
    np.testing.assert_array_equal(indices, dense_indices.numpy())
    blocks = model.match(held_out, top_k=15, block_size=3)
    dense = model.match(held_out, top_k=15, block_size=held_out.n_obs)
    np.testing.assert_allclose(blocks.toarray(), dense.toarray(), rtol=1e-4, atol=1e-6)
    plain = model.match(held_out, top_k=15, n_rerank=0)
    assert not np.allclose(plain.toarray(), dense.toarray())  # the cross term re-ranks


def test_embeddings_attention_and_the_users_data_untouched(trained):
    model, _, held_out = trained
    before = held_out.copy()
    latent = model.get_latent_representation(held_out.mod["atac"], modality="atac")
    assert latent.shape == (held_out.n_obs, SMALL["embed_dim"])
    np.testing.assert_allclose(np.linalg.norm(latent, axis=1), 1.0, rtol=1e-5)
    attention = model.get_attention(held_out, modality="atac", indices=range(10))
    assert attention.shape == (SMALL["n_tokens_atac"], SMALL["n_tokens_atac"])
    np.testing.assert_allclose(attention.sum(1), 1.0, rtol=1e-4)
    assert attention.index[0].startswith("chr1_")  # tokens follow the genome
    model.match(held_out, top_k=5)
    for name in ("rna", "atac"):
        after, original = held_out.mod[name], before.mod[name]
        np.testing.assert_array_equal(after.X.toarray(), original.X.toarray())
        pd.testing.assert_frame_equal(after.obs, original.obs)
        pd.testing.assert_frame_equal(after.var, original.var)
        assert set(after.uns) == set(original.uns)
    pd.testing.assert_frame_equal(held_out.obs, before.obs)
    assert set(held_out.uns) == set(before.uns)
    assert "_scvi_uuid" not in held_out.mod["rna"].uns


@pytest.mark.parametrize("temperature", [-0.05, 0, 0.0, float("nan"), float("inf"), "0.05"])
def test_temperatures_that_are_not_positive_numbers_are_errors_at_every_entry(
    trained, temperature
):
    """A negative temperature would reverse the ranking, 0 give NaN rows: refused by
    match, match_embeddings, probabilities, true_pair_log_probabilities and assign("ot")."""
    model, _, held_out = trained
    message = re.escape(
        f"temperature must be a positive finite number (e.g. 0.05), not {temperature!r}."
    )
    indices, scores = np.array([[0, 1], [1, 0]]), np.array([[1.0, 0.0], [1.0, 0.0]])
    x = np.eye(2, dtype=np.float32)
    entries = {
        "match": lambda: model.match(held_out, top_k=5, temperature=temperature),
        "match_embeddings": lambda: match_embeddings(x, x, temperature=temperature),
        "probabilities": lambda: probabilities(indices, scores, 2, temperature),
        "true_pair": lambda: true_pair_log_probabilities(indices, scores, temperature),
        "ot": lambda: assign(sp.csr_matrix(np.eye(2)), "ot", temperature),
    }
    for entry, call in entries.items():
        with pytest.raises(ValueError, match=f"^{message}$"):
            call()
            pytest.fail(entry)


def test_top_k_below_one_is_an_error_in_match_and_match_embeddings(trained):
    model, _, held_out = trained
    x = np.eye(2, dtype=np.float32)
    with pytest.raises(ValueError, match=r"^top_k must be at least 1, not 0\.$"):
        model.match(held_out, top_k=0)
    with pytest.raises(ValueError, match=r"^top_k must be at least 1, not 0\.$"):
        match_embeddings(x, x, top_k=0)
    with pytest.raises(ValueError, match=r"^top_k must be at least 1, not -3\.$"):
        match_embeddings(x, x, top_k=-3)


def test_features_matched_by_name(trained):
    model, _, held_out = trained
    rna, atac = held_out.mod["rna"], held_out.mod["atac"]
    reordered = model.match(rna[:, ::-1].copy(), atac[:, ::-1].copy(), top_k=10)
    np.testing.assert_allclose(reordered.toarray(), model.match(rna, atac, top_k=10).toarray())
    with pytest.warns(UserWarning, match="read as zero counts"):
        model.match(rna[:, 10:].copy(), atac, top_k=10)


def test_save_load_gives_identical_match_matrices(trained, tmp_path):
    model, reference, held_out = trained
    folder = tmp_path / "matcher"
    model.save(folder, save_anndata=True)
    loaded = CrossAttentionMatcher.load(folder)
    expected = model.match(held_out, top_k=20).toarray()
    np.testing.assert_array_equal(loaded.match(held_out, top_k=20).toarray(), expected)
    without_data = CrossAttentionMatcher.load(folder, adata=False)
    assert without_data.adata is None
    np.testing.assert_array_equal(without_data.match(held_out, top_k=20).toarray(), expected)
    assert without_data.match_temperature_ == model.match_temperature_
    assert without_data.match_temperatures_ == model.match_temperatures_
    assert without_data.temperature_fit == model.temperature_fit
    with pytest.raises(ValueError, match="already exists"):
        model.save(folder)


def test_load_matches_the_features_of_the_given_mudata_by_name(trained, tmp_path):
    """A MuData with the features in another order, or a subset of them, is read by name
    at load (not registered in its own order): the loaded model matches as the original
    and the user's MuData is untouched."""
    model, _, held_out = trained
    folder = tmp_path / "matcher"
    model.save(folder)
    rna, atac = held_out.mod["rna"], held_out.mod["atac"]
    reversed_features = MuData({"rna": rna[:, ::-1].copy(), "atac": atac[:, ::-1].copy()})
    loaded = CrossAttentionMatcher.load(folder, adata=reversed_features)
    assert list(loaded.feature_names("rna")) == list(model.feature_names("rna"))
    np.testing.assert_array_equal(
        loaded.match(held_out, top_k=20).toarray(), model.match(held_out, top_k=20).toarray()
    )
    np.testing.assert_allclose(
        loaded.get_latent_representation(modality="atac"),
        model.get_latent_representation(held_out, modality="atac"),
        atol=1e-6,
    )
    assert list(reversed_features.mod["rna"].var_names) == list(rna.var_names[::-1])
    assert "_scvi_uuid" not in reversed_features.uns
    fewer_genes = MuData({"rna": rna[:, 10:].copy(), "atac": atac.copy()})
    with pytest.warns(UserWarning, match="the RNA modality lacks 10 of the model's 120 genes"):
        loaded = CrossAttentionMatcher.load(folder, adata=fewer_genes)
    np.testing.assert_array_equal(
        loaded.match(loaded.adata, top_k=20).toarray(),
        model.match(fewer_genes, top_k=20).toarray(),
    )


def test_editing_the_registered_features_after_setup_is_a_clear_error():
    mdata = simulate_paired(n_cells=60, n_genes=20, n_peaks=50)
    CrossAttentionMatcher.setup_mudata(mdata)
    model = CrossAttentionMatcher(mdata, **SMALL)
    mdata.mod["rna"] = mdata.mod["rna"][:, ::-1].copy()
    with pytest.raises(ValueError, match="The RNA modality of the MuData registered with this"):
        model.train(max_epochs=1, batch_size=32)


def test_setup_and_matching_inputs_that_cannot_be_read_say_what_to_change(trained):
    model, _, held_out = trained
    rna, atac = held_out.mod["rna"], held_out.mod["atac"]
    reordered = MuData({"rna": rna.copy(), "atac": atac[::-1].copy()})
    with pytest.raises(ValueError, match="hold the same cells in different orders"):
        CrossAttentionMatcher.setup_mudata(reordered)
    with pytest.raises(ValueError, match=r"batch_key 'rna:nope' is not a column of mdata.obs"):
        CrossAttentionMatcher.setup_mudata(held_out.copy(), batch_key="rna:nope")
    missing_batch = held_out.copy()
    missing_batch.obs["run"] = "a"
    missing_batch.obs.iloc[:3, missing_batch.obs.columns.get_loc("run")] = np.nan
    with pytest.raises(ValueError, match="batch_key 'run' has 3 missing"):
        CrossAttentionMatcher.setup_mudata(missing_batch, batch_key="run")
    with pytest.raises(ValueError, match="The RNA AnnData has no cells"):
        model.match(rna[:0], atac)


def test_trains_and_matches_from_a_backed_mudata_read_only(trained, tmp_path):
    """A backed h5mu: matching equals the in-memory matching; training reads the counts
    from disk (the registered matrix is the file's, minibatches in blocks of rows) and
    matches well above chance; the file is unchanged; a closed one is refused."""
    model, _, held_out = trained
    held_out.write(tmp_path / "held_out.h5mu")
    backed_held_out = mudata.read_h5mu(tmp_path / "held_out.h5mu", backed=True)
    expected = model.match(held_out, top_k=20).toarray()
    np.testing.assert_allclose(
        model.match(backed_held_out, top_k=20).toarray(), expected, atol=1e-6
    )

    simulate_paired()[:320].copy().write(tmp_path / "reference.h5mu")  # the fixture's cells
    digest = hashlib.sha256((tmp_path / "reference.h5mu").read_bytes()).hexdigest()
    reference = mudata.read_h5mu(tmp_path / "reference.h5mu", backed=True)
    assert isinstance(reference.mod["rna"].X, CSRDataset) and is_on_disk(reference)
    scvi.settings.seed = 0
    CrossAttentionMatcher.setup_mudata(reference, batch_key="rna:batch")
    on_disk = CrossAttentionMatcher(reference, **SMALL)
    on_disk.train(**FAST)
    assert isinstance(on_disk.adata_manager.get_from_registry("X"), CSRDataset)
    assert matching_score(on_disk.match(held_out, top_k=50)) > 2 / held_out.n_obs
    reference.file.close()
    assert hashlib.sha256((tmp_path / "reference.h5mu").read_bytes()).hexdigest() == digest
    with pytest.raises(ValueError, match=r"reopen it with mudata.read_h5mu\("):
        on_disk.match(reference)


def test_seeded_training_is_deterministic():
    mdata = simulate_paired(n_cells=160)
    matrices = []
    for _ in range(2):
        scvi.settings.seed = 3
        copy = mdata.copy()
        CrossAttentionMatcher.setup_mudata(copy)
        model = CrossAttentionMatcher(copy, **SMALL)
        model.train(max_epochs=2, batch_size=64, enable_progress_bar=False)
        matrices.append(model.match(copy, top_k=10).toarray())
    np.testing.assert_array_equal(*matrices)


def test_paper_conv_tokenizer_and_infonce_objective_train():
    mdata = simulate_paired(n_cells=160)
    CrossAttentionMatcher.setup_mudata(mdata)
    infonce = {"objective": "infonce", "alpha": 0.0, "temperature_fit": "score"}
    for settings, tokenizer in (
        ({"tokenizer": "conv"}, RegionTokenizer),
        (infonce, LocalTokenizer),
    ):
        model = CrossAttentionMatcher(mdata, **{**SMALL, **settings})
        assert isinstance(model.module.rna_tokenizer, tokenizer)
        assert isinstance(model.module.atac_tokenizer, tokenizer)
        model.train(max_epochs=1, batch_size=64, enable_progress_bar=False)
        assert model.match(mdata, top_k=10).shape == (160, 160)
    assert model.match_temperature_ == model.match_temperatures_["score"]
    assert model.module.cross_attention is None  # InfoNCE: no cross unit, no unused weights
    with pytest.raises(ValueError, match="objective='infonce' scores the self-attention"):
        CrossAttentionMatcher(mdata, objective="infonce", alpha=0.5)


def _random_links(n_genes: int, n_peaks: int, seed: int = 0) -> sp.csr_matrix:
    """Each peak linked to one random gene (genes x peaks)."""
    genes = np.random.default_rng(seed).integers(n_genes, size=n_peaks)
    return sp.csr_matrix((np.ones(n_peaks), (genes, np.arange(n_peaks))), (n_genes, n_peaks))


def _gene_activity_setting():
    """Registered reference (320 cells), held-out cells, random gene-peak links, CLIP."""
    scvi.settings.seed = 0
    mdata = simulate_paired()
    reference, held_out = mdata[:320].copy(), mdata[320:].copy()
    CrossAttentionMatcher.setup_mudata(reference)
    links = _random_links(reference.mod["rna"].n_vars, reference.mod["atac"].n_vars)
    return reference, held_out, links, {"objective": "infonce", "alpha": 0.0, "tokenizer": "local"}


def test_atac_read_as_gene_activity(tmp_path):
    """``atac_input="gene_activity"``: the ATAC encoder reads each gene's summed linked
    peaks, normalised as the RNA and in the RNA's gene order; it trains, matches above
    chance, saves and loads, and names its ATAC tokens by genes."""
    reference, held_out, links, clip = _gene_activity_setting()
    model = CrossAttentionMatcher(
        reference, gene_region_map=links, atac_input="gene_activity", **{**SMALL, **clip}
    )
    counts = torch.as_tensor(held_out.mod["atac"].X.toarray())
    activity = counts @ torch.as_tensor(links.toarray(), dtype=torch.float32).T
    expected = model.module.normalise_rna(activity)
    torch.testing.assert_close(model.module.normalise_atac(counts), expected)
    n_tokens = SMALL["n_tokens_atac"]
    assert model.module.atac_tokenizer.width == -(-120 // n_tokens)  # 120 genes, not 600 peaks
    model.train(**FAST)
    matrix = model.match(held_out, top_k=50)
    assert matching_score(matrix) > 2 / held_out.n_obs  # chance: 1 / n
    labels = model.get_attention(held_out, modality="atac").index
    assert all(label.startswith("gene") for label in labels)
    model.save(tmp_path / "model")
    loaded = CrossAttentionMatcher.load(tmp_path / "model", adata=False)
    assert loaded.module.atac_input == "gene_activity"
    np.testing.assert_array_equal(loaded.match(held_out, top_k=50).toarray(), matrix.toarray())
    with pytest.raises(ValueError, match=r"atac_input='gene_activity' sums the peaks linked"):
        CrossAttentionMatcher(reference, atac_input="gene_activity")
    with pytest.raises(ValueError, match="atac_input must be 'peaks' or 'gene_activity'"):
        CrossAttentionMatcher(reference, gene_region_map=links, atac_input="genes")


def test_shared_encoder_reads_both_modalities_as_standardised_genes(tmp_path):
    """``shared_encoder``: one tokenizer and self-attention unit for both modalities (one
    set of parameters), each modality's genes standardised with its training statistics;
    it trains, matches above chance, and saves and loads with its statistics."""
    reference, held_out, links, settings = _gene_activity_setting()
    model = CrossAttentionMatcher(
        reference,
        gene_region_map=links,
        atac_input="gene_activity",
        shared_encoder=True,
        **{**SMALL, **settings},
    )
    module = model.module
    assert module.atac_tokenizer is module.rna_tokenizer
    assert module.atac_self_attention is module.rna_self_attention
    separate = CrossAttentionMatcher(
        reference, gene_region_map=links, atac_input="gene_activity", **{**SMALL, **settings}
    )
    n_parameters = sum(p.numel() for p in module.parameters())
    assert n_parameters < sum(p.numel() for p in separate.module.parameters())
    model.train(**FAST)
    rna = module.normalise_rna(torch.as_tensor(reference.mod["rna"].X.toarray()))
    atac = module.normalise_atac(torch.as_tensor(reference.mod["atac"].X.toarray()))
    for side, features in enumerate((rna, atac)):
        torch.testing.assert_close(module.feature_means[side], features.mean(0))
        expected_scales = features.std(0, unbiased=False).clamp_min(0.01)
        torch.testing.assert_close(module.feature_scales[side], expected_scales)
    matrix = model.match(held_out, top_k=50)
    assert matching_score(matrix) > 2 / held_out.n_obs  # chance: 1 / n
    model.save(tmp_path / "model")
    loaded = CrossAttentionMatcher.load(tmp_path / "model", adata=False)
    assert loaded.module.atac_tokenizer is loaded.module.rna_tokenizer
    np.testing.assert_array_equal(loaded.match(held_out, top_k=50).toarray(), matrix.toarray())
    with pytest.raises(ValueError, match="shared_encoder=True encodes both modalities as genes"):
        CrossAttentionMatcher(reference, shared_encoder=True)


def test_linear_encoder_starts_at_the_principal_axes_of_the_training_rna(tmp_path):
    """``encoder="linear"``: one matrix projects both modalities' standardised genes; the
    first training starts it at the PCA of the training RNA (the gene_activity_pca
    baseline), later ones do not reset it; it trains, matches above chance, saves and
    loads, and has no attention."""
    from sklearn.decomposition import PCA

    reference, held_out, links, settings = _gene_activity_setting()
    linear = {"gene_region_map": links, "atac_input": "gene_activity", "shared_encoder": True}
    model = CrossAttentionMatcher(reference, **linear, **{**SMALL, **settings}, encoder="linear")
    module = model.module
    assert module.projection.weight.shape == (SMALL["embed_dim"], 120)
    model.fit_statistics()
    rna = module.normalise_rna(torch.as_tensor(reference.mod["rna"].X.toarray()))
    standardised = ((rna - module.feature_means[0]) / module.feature_scales[0]).numpy()
    axes = PCA(SMALL["embed_dim"]).fit(standardised).components_
    start = module.projection.weight.detach().numpy().copy()
    np.testing.assert_allclose(np.abs(start), np.abs(axes), atol=1e-4)  # axes up to sign
    model.train(**FAST, plan_kwargs={"lr": 1e-2})  # a few steps on few cells: a larger lr
    trained = module.projection.weight.detach().clone()
    assert not np.allclose(trained.numpy(), start, atol=1e-3)
    model.train(max_epochs=1, enable_progress_bar=False)  # continues: no new start
    again = module.projection.weight.detach().numpy()
    assert np.abs(again - trained.numpy()).max() < np.abs(again - start).max()
    matrix = model.match(held_out, top_k=50)
    assert matching_score(matrix) > 2 / held_out.n_obs  # chance: 1 / n
    model.save(tmp_path / "model")
    loaded = CrossAttentionMatcher.load(tmp_path / "model", adata=False)
    np.testing.assert_array_equal(loaded.match(held_out, top_k=50).toarray(), matrix.toarray())
    with pytest.raises(ValueError, match="encoder is linear .encoder='linear'.: it has no"):
        model.get_attention(held_out)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"encoder": "mlp"}, "encoder must be 'attention' or 'linear', not 'mlp'"),
        ({"encoder": "linear"}, "encoder='linear' projects the genes of both modalities"),
        (
            {"encoder": "linear", "shared_encoder": True, "alpha": 0.5},
            "encoder='linear' makes no tokens for the cross-attention unit: set alpha=0",
        ),
        (
            {"encoder": "linear", "shared_encoder": True, "alpha": 0.0, "embed_dim": 500},
            "encoder='linear' needs 1 <= embed_dim <= the 120 genes, not 500",
        ),
    ],
)
def test_linear_encoder_settings_that_cannot_work_are_refused(settings, message):
    reference, _, links, _ = _gene_activity_setting()
    with pytest.raises(ValueError, match=re.escape(message)):
        CrossAttentionMatcher(
            reference, gene_region_map=links, atac_input="gene_activity", **settings
        )


def test_infonce_warm_start_of_the_triplet_objective(trained):
    from types import SimpleNamespace

    model, reference, _ = trained
    module = model.module.eval()
    tensors = next(model.iter_minibatches(batch_size=32))
    inference_outputs = module.inference(**module._get_inference_input(tensors))
    warm = module.loss(tensors, inference_outputs, {}, warm_start=True).loss
    logits = inference_outputs["e0"] @ inference_outputs["t0"].T / 0.07
    targets = torch.arange(len(logits))
    infonce = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
    torch.testing.assert_close(warm, infonce)
    triplet = module.loss(tensors, inference_outputs, {}).loss
    assert not torch.isclose(triplet, warm)

    plan = MatcherTrainingPlan(module, infonce_warmup_epochs=2)
    for epoch, expected in ((0, True), (1, True), (2, False)):
        plan._trainer = SimpleNamespace(current_epoch=epoch)
        assert plan.step_loss_kwargs("train") == {"warm_start": expected}
        assert plan.step_loss_kwargs("validation") == {"warm_start": False}  # own objective
    with pytest.raises(ValueError, match="infonce_warmup_epochs must be 0 or more, not -1"):
        MatcherTrainingPlan(module, infonce_warmup_epochs=-1)


def test_bad_inputs_are_errors_that_say_what_to_change(trained):
    model, _, held_out = trained
    rna_only = MuData({"rna": held_out.mod["rna"].copy()})
    with pytest.raises(
        ValueError, match=r"The MuData has no ATAC modality 'atac' \(modalities: \['rna'\]\)"
    ):
        CrossAttentionMatcher.setup_mudata(rna_only)
    shifted = MuData(
        {"rna": held_out.mod["rna"][:40].copy(), "atac": held_out.mod["atac"][40:].copy()}
    )
    with pytest.raises(ValueError, match="The RNA and ATAC modalities hold different cells"):
        CrossAttentionMatcher.setup_mudata(shifted)
    other_peaks = held_out.mod["atac"].copy()
    other_peaks.var_names = [f"chr9_{i}_{i + 1}" for i in range(other_peaks.n_vars)]
    with pytest.raises(
        ValueError, match=r"the ATAC AnnData shares only 0 of the model's 600 peaks"
    ):
        model.match(held_out.mod["rna"], other_peaks)
    with pytest.raises(ValueError, match="Pass the ATAC cells"):
        model.match(held_out.mod["rna"])
    with pytest.raises(ValueError, match="reads paired RNA and ATAC counts"):
        CrossAttentionMatcher.setup_anndata(held_out.mod["rna"].copy())
    with pytest.raises(ValueError, match="modality must be 'rna' or 'atac'"):
        model.get_latent_representation(held_out, modality="protein")
    fractional = held_out.mod["rna"].copy()
    fractional.X = fractional.X * 0.5
    with pytest.raises(ValueError, match="non-integer values"):
        model.match(fractional, held_out.mod["atac"])


def test_untrained_model_refuses_to_match():
    mdata = simulate_paired(n_cells=100)
    CrossAttentionMatcher.setup_mudata(mdata)
    with pytest.raises(RuntimeError, match="not trained"):
        CrossAttentionMatcher(mdata, **SMALL).match(mdata)


# ---- the matching utilities
def test_genome_order_sorts_peaks_and_genes_by_their_linked_peaks():
    peaks = ["chr2_100_200", "chr10_5_9", "chr1_900_950", "chr1_50_80", "chrX_1_2"]
    assert [peaks[i] for i in genome_order(peaks)] == [
        "chr1_50_80",
        "chr1_900_950",
        "chr2_100_200",
        "chr10_5_9",
        "chrX_1_2",
    ]
    links = sp.csr_matrix(np.array([[1, 0, 0, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 0]]))
    # gene0 -> chr2 (rank 2), gene1 -> chr1_50 (rank 0), gene2 unlinked: last
    np.testing.assert_array_equal(gene_genome_order(["g0", "g1", "g2"], peaks, links), [1, 0, 2])
    with pytest.warns(UserWarning, match="not all named chr_start_end"):
        np.testing.assert_array_equal(genome_order(["a", "b"]), [0, 1])


def test_probabilities_rows_sum_to_one_with_top_k_nonzeros():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 4)), rng.normal(size=(50, 4))
    matrix = match_embeddings(x, y, top_k=6, temperature=0.3, block_size=7)
    np.testing.assert_allclose(matrix.sum(1).A1, 1.0, rtol=1e-6)
    assert (np.diff(matrix.indptr) == 6).all()
    dense = np.exp(x @ y.T / 0.3)
    np.testing.assert_allclose(
        match_embeddings(x, y, top_k=50, temperature=0.3).toarray(),
        dense / dense.sum(1, keepdims=True),
        rtol=1e-5,
    )


def test_probabilities_leave_the_candidate_arrays_untouched():
    indices = np.array([[2, 0, 1], [1, 2, 0]], dtype=np.int32)
    scores = np.array([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]], dtype=np.float32)
    matrix = probabilities(indices, scores, 3, 1.0)
    np.testing.assert_array_equal(indices, [[2, 0, 1], [1, 2, 0]])
    weights = np.exp([3.0, 2.0, 1.0]) / np.exp([3.0, 2.0, 1.0]).sum()
    np.testing.assert_allclose(matrix.toarray()[0], weights[[1, 2, 0]], rtol=1e-6)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_likelihood_temperature_is_large_for_random_scores_and_small_for_perfect_ones():
    rng = np.random.default_rng(0)
    n = 200
    x, y = _unit(rng.normal(size=(n, 16))), _unit(rng.normal(size=(n, 16)))
    indices, scores = top_k_scores(x, y, n)
    temperature = fit_temperature(indices, scores)  # likelihood by default
    assert temperature >= 5.0
    assert probabilities(indices, scores, n, temperature).max() < 1.5 / n  # near uniform
    # the competition score rewards sharp rows even on random scores: confident and wrong
    sharp = fit_temperature(indices, scores, "score")
    assert sharp < 0.5 and probabilities(indices, scores, n, sharp).max() > 20 / n
    assert fit_temperature(*top_k_scores(x, x, n)) == TEMPERATURE_GRID[0]


def test_likelihood_fit_trades_competition_score_for_calibration_on_a_weak_model():
    rng = np.random.default_rng(1)
    x = _unit(rng.normal(size=(300, 16)))
    y = _unit(x + rng.normal(scale=1.0, size=x.shape))
    indices, scores = top_k_scores(x, y, 300)
    fits = {fit: fit_temperature(indices, scores, fit) for fit in ("likelihood", "score")}
    assert fits["score"] < fits["likelihood"]
    log_p = {
        fit: true_pair_log_probabilities(indices, scores, t).mean() for fit, t in fits.items()
    }
    score = {
        fit: matching_score(probabilities(indices, scores, 300, t)) for fit, t in fits.items()
    }
    assert log_p["likelihood"] > log_p["score"] and score["score"] > score["likelihood"]


def test_true_pair_outside_the_kept_columns_counts_as_the_rows_last_candidate():
    indices = np.array([[1, 2], [1, 0]])  # row 0's true pair (column 0) was not kept
    scores = np.array([[2.0, 1.0], [3.0, 0.0]])
    expected = np.log([np.exp(1.0) / (np.exp(2.0) + np.exp(1.0)), 1 / (1 + np.exp(-3.0))])
    np.testing.assert_allclose(true_pair_log_probabilities(indices, scores, 1.0), expected)


def test_unknown_temperature_fit_is_an_error():
    indices, scores = np.array([[0, 1], [1, 0]]), np.array([[1.0, 0.0], [1.0, 0.0]])
    message = "temperature_fit must be 'likelihood' or 'score', not 'competition'."
    with pytest.raises(ValueError, match=message):
        fit_temperature(indices, scores, "competition")
    mdata = simulate_paired(n_cells=40)
    CrossAttentionMatcher.setup_mudata(mdata)
    with pytest.raises(ValueError, match=message):
        CrossAttentionMatcher(mdata, temperature_fit="competition", **SMALL)


def test_sparse_entropic_ot_equals_pot_on_full_support():
    ot = pytest.importorskip("ot")
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(12, 9))
    plan = ot.sinkhorn(np.full(12, 1 / 12), np.full(9, 1 / 9), -scores, 0.5, stopThr=1e-12)
    mine = entropic_ot(sp.csr_matrix(scores), epsilon=0.5, tol=1e-10).toarray()
    np.testing.assert_allclose(mine, plan / plan.sum(1, keepdims=True), atol=1e-7)


def test_bipartite_assignment_equals_hungarian_on_full_support_and_always_exists():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(8, 8))
    matrix = probabilities(np.argsort(-scores, 1), -np.sort(-scores, 1), 8, 0.5)
    rows, columns = linear_sum_assignment(-np.log(matrix.toarray()))
    expected = np.zeros((8, 8))
    expected[rows, columns] = 1
    np.testing.assert_array_equal(bipartite_assignment(matrix).toarray(), expected)
    one_candidate = probabilities(np.zeros((8, 1), dtype=int), np.zeros((8, 1)), 8, 1.0)
    assigned = bipartite_assignment(one_candidate)  # all rows want column 0: fallback edges
    np.testing.assert_array_equal(assigned.sum(0).A1, 1.0)


# ---- real data
@requires_shared_data
def test_snareseq_genome_order_and_matching_contract_on_real_cells():
    """Real peaks and genes go along the genome; a model on a real subset matches held-out
    cells with the contract's output. (Above-chance matching on real data needs the full
    training set: see docs/matching.md for the benchmark.)"""
    from scvi_ext.data import load_snareseq, load_snareseq_gene_region_map
    from scvi_ext.matching import peak_positions

    mdata, links = load_snareseq(), load_snareseq_gene_region_map()
    peaks, genes = mdata.mod["atac"].var_names, mdata.mod["rna"].var_names
    positions = peak_positions(peaks).iloc[genome_order(peaks)]
    key = positions["chrom_rank"].to_numpy() * 1e10 + positions["start"].to_numpy()
    assert (np.diff(key) >= 0).all()
    gene_order = gene_genome_order(genes, peaks, links)
    peak_rank = np.empty(len(peaks))
    peak_rank[genome_order(peaks)] = np.arange(len(peaks))
    first_peak_rank = [peak_rank[links[i].indices].mean() for i in gene_order[:200]]
    assert (np.diff(first_peak_rank) >= 0).all()

    scvi.settings.seed = 0
    cells = np.random.default_rng(0).choice(mdata.n_obs, 800, replace=False)
    reference, held_out = mdata[np.sort(cells[:600])].copy(), mdata[np.sort(cells[600:])].copy()
    CrossAttentionMatcher.setup_mudata(reference)
    model = CrossAttentionMatcher(reference, gene_region_map=links, **SMALL)
    model.train(max_epochs=1, batch_size=128, enable_progress_bar=False)
    matrix = model.match(held_out.mod["rna"], held_out.mod["atac"][:150].copy(), top_k=100)
    assert matrix.shape == (200, 150)
    np.testing.assert_allclose(matrix.sum(1).A1, 1.0, rtol=1e-5)
    assert np.diff(matrix.indptr).max() <= 100


DDP_SCRIPT = """
import scvi
import torch

torch.set_num_threads(1)
from test_matching import SMALL
from scvi_ext.matching import simulate_paired
from scvi_ext.matching import CrossAttentionMatcher

scvi.settings.seed = 0
mdata = simulate_paired(n_cells=200)
CrossAttentionMatcher.setup_mudata(mdata)
model = CrossAttentionMatcher(mdata, **SMALL)
model.train(max_epochs=2, batch_size=32, accelerator="cpu", devices=2, strategy="ddp",
            enable_progress_bar=False)
matrix = model.match(mdata, top_k=10)
result = matrix.shape[0]
"""


def test_cpu_ddp_with_two_processes_trains_and_both_ranks_match(tmp_path):
    assert ddp_rank_results(DDP_SCRIPT, tmp_path) == ["200"] * 2

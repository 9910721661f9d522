"""Gradient saliency recovers the simulated marker genes."""

import pytest
import torch

from scvi_ext.interpret import saliency
from scvi_ext.interpret._saliency import _attributions
from scvi_ext.model import ScNym
from scvi_ext.scnym import ScNymModule


@pytest.fixture
def trained_model(sim_adata):
    ScNym.setup_anndata(sim_adata, labels_key="labels", unlabeled_category="Unknown")
    model = ScNym(sim_adata, n_hidden=32)
    model.train(max_epochs=10, batch_size=64, enable_progress_bar=False)
    return model


def marker_hits(table, sim_adata) -> dict[str, float]:
    """Fraction of each type's top genes that are its simulated markers."""
    marker_of = sim_adata.var["marker_of"]
    return {
        cell_type: float((marker_of[genes.to_numpy()] == cell_type).mean())
        for cell_type, genes in table.groupby("cell_type")["gene"]
    }


def test_integrated_gradients_rank_each_types_markers_first(trained_model, sim_adata):
    table = saliency(trained_model, method="integrated", n_steps=8, n_cells=40, n_top=10)
    assert set(table.columns) == {"cell_type", "rank", "gene", "score"}
    assert sorted(table["cell_type"].unique()) == sorted(trained_model.label_names)
    assert min(marker_hits(table, sim_adata).values()) >= 0.7  # chance: 0.15
    assert (table.groupby("cell_type")["score"].apply(lambda s: s.is_monotonic_decreasing)).all()


def test_expected_gradients_rank_markers_of_most_types(trained_model, sim_adata):
    table = saliency(trained_model, method="expected", n_steps=8, n_cells=40, n_top=10)
    hits = marker_hits(table, sim_adata)
    assert sorted(hits) == sorted(trained_model.label_names)
    assert sum(value >= 0.5 for value in hits.values()) >= len(hits) - 1


def test_bad_saliency_arguments(trained_model):
    with pytest.raises(ValueError, match="method must be"):
        saliency(trained_model, method="guided")
    with pytest.raises(ValueError, match="Unknown cell types"):
        saliency(trained_model, cell_types=["neuron"])
    for name in ("n_steps", "n_cells", "n_top"):  # before: NaN scores, a loader error, []
        with pytest.raises(ValueError, match=f"{name} must be a positive integer, not 0"):
            saliency(trained_model, **{name: 0})


def test_saliency_of_cell_types_without_cells_says_so(trained_model, sim_adata):
    """Before: pandas' "No objects to concatenate"."""
    labelled = sim_adata[sim_adata.obs["labels"] != "Unknown"]
    first, second = sorted(labelled.obs["labels"].unique())[:2]
    only_first = labelled[labelled.obs["labels"] == first].copy()
    with pytest.raises(ValueError, match=rf"No cell of adata is labelled any of \['{second}'\]"):
        saliency(trained_model, only_first, cell_types=[second], by="label")
    with pytest.warns(UserWarning, match=rf"No cell is labelled \['{second}'\]; saliency leaves"):
        table = saliency(
            trained_model, only_first, cell_types=[first, second], by="label", n_steps=2
        )
    assert set(table["cell_type"]) == {first}


@pytest.mark.parametrize("method", ["integrated", "expected"])
def test_attributions_stay_on_the_modules_device(method):
    # No GPU here: the meta device stands in for one. A tensor made on the CPU and mixed
    # with the module's tensors raises, as it would on a GPU.
    module = ScNymModule(n_input=20, n_labels=3).eval().to("meta")
    x = torch.ones(4, 20, device="meta")
    batch_index = torch.zeros(4, 1, device="meta")
    baselines = torch.zeros(5, 20, device="meta")
    generator = torch.Generator().manual_seed(0)
    scores = _attributions(module, x, batch_index, 0, baselines, 2, generator, method)
    assert scores.device.type == "meta"
    assert scores.shape == x.shape


def test_saliency_needs_a_trained_differentiable_classifier(sim_adata):
    from scvi_ext.model import CELLULAR

    ScNym.setup_anndata(sim_adata, labels_key="labels", unlabeled_category="Unknown")
    with pytest.raises(RuntimeError, match="This ScNym is not trained"):
        saliency(ScNym(sim_adata, n_hidden=8))
    reference = sim_adata[sim_adata.obs["labels"] != "Unknown"].copy()
    CELLULAR.setup_anndata(reference, labels_key="labels")
    with pytest.raises(ValueError, match="DifferentiableClassifierModule"):
        saliency(CELLULAR(reference, n_latent=4, n_hidden=(8,)))

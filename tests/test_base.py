"""Shared base: paired splitter, plan helpers, gradient reversal, CPU DDP training."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import query_mask
from scvi import REGISTRY_KEYS

from scvi_ext.base import (
    LABELLED,
    UNLABELLED,
    PairedDataLoader,
    PairedDataSplitter,
    labelled_mask,
    sigmoid_ramp,
)
from scvi_ext.model import ScNym
from scvi_ext.nn import grad_reverse


def manager_of(adata):
    ScNym.setup_anndata(adata, labels_key="labels", unlabeled_category="Unknown")
    return ScNym(adata, n_hidden=8).adata_manager


def test_labelled_mask_follows_unlabeled_category(sim_adata):
    manager = manager_of(sim_adata)
    np.testing.assert_array_equal(labelled_mask(manager), ~query_mask(sim_adata))


def test_paired_loader_pairs_every_step_and_cycles_the_shorter_side(sim_adata):
    manager = manager_of(sim_adata)
    labelled, unlabelled = np.arange(100), np.arange(400, 430)
    loader = PairedDataLoader(manager, labelled, unlabelled, batch_size=16)
    steps = list(loader)
    assert len(steps) == len(loader) == 7  # ceil(100 / 16): the longer side sets the epoch
    assert all(step[LABELLED] is not None and step[UNLABELLED] is not None for step in steps)
    seen_labelled = sum(len(step[LABELLED][REGISTRY_KEYS.X_KEY]) for step in steps)
    seen_unlabelled = sum(len(step[UNLABELLED][REGISTRY_KEYS.X_KEY]) for step in steps)
    assert seen_labelled == 100
    assert seen_unlabelled > 30  # the 30 query cells were served more than once


def test_paired_loader_empty_side_yields_none(sim_adata):
    manager = manager_of(sim_adata)
    loader = PairedDataLoader(manager, np.arange(50), np.array([], dtype=int), batch_size=16)
    steps = list(loader)
    assert len(steps) == 4
    assert all(step[UNLABELLED] is None for step in steps)
    with pytest.raises(ValueError, match="at least one"):
        PairedDataLoader(manager, np.array([], dtype=int), np.array([], dtype=int))


def test_splitter_holds_out_labelled_cells_only(sim_adata):
    manager = manager_of(sim_adata)
    splitter = PairedDataSplitter(manager, train_size=0.8, batch_size=32)
    splitter.setup()
    n_labelled = int((~query_mask(sim_adata)).sum())
    assert len(splitter.val_idx) == n_labelled - int(np.ceil(0.8 * n_labelled))
    assert not query_mask(sim_adata)[splitter.val_idx].any()
    assert query_mask(sim_adata)[splitter.unlabelled_idx].all()
    assert len(np.intersect1d(splitter.train_idx, splitter.val_idx)) == 0
    assert len(splitter.train_idx) + len(splitter.val_idx) == sim_adata.n_obs


def test_sigmoid_ramp():
    assert sigmoid_ramp(0, 20) == pytest.approx(np.exp(-5))
    assert sigmoid_ramp(10, 20) == pytest.approx(np.exp(-1.25))
    assert sigmoid_ramp(20, 20) == 1.0 and sigmoid_ramp(50, 20) == 1.0
    assert sigmoid_ramp(3, 0) == 1.0


def test_gradient_reversal_scales_and_flips_gradient():
    x = torch.ones(3, requires_grad=True)
    (grad_reverse(x, 0.1) * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), [-0.1, -0.2, -0.3], rtol=1e-6)


DDP_SCRIPT = textwrap.dedent(
    """
    import os

    import numpy as np
    import scvi
    from scvi_ext.data import simulate
    from scvi_ext.model import ScNym

    scvi.settings.seed = 0
    adata = simulate(n_cells=300, n_genes=60, n_cell_types=3, n_markers=10, seed=2)
    labels = adata.obs["cell_type"].astype(str).to_numpy().copy()
    labels[(adata.obs["condition"] == "query").to_numpy()] = "Unknown"
    adata.obs["labels"] = labels
    ScNym.setup_anndata(adata, labels_key="labels", unlabeled_category="Unknown")
    model = ScNym(adata, n_hidden=16)
    model.train(max_epochs=2, batch_size=32, accelerator="cpu", devices=2, strategy="ddp",
                enable_progress_bar=False)
    # one file per rank: the ranks share stdout, so their prints can interleave
    rank = os.environ.get("LOCAL_RANK", "0")
    with open(f"ddp_ok_rank{rank}.txt", "w") as handle:
        handle.write(str(model.predict().shape[0]))
    """
)


def test_cpu_ddp_with_two_processes_trains(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = sorted(path.name for path in tmp_path.glob("ddp_ok_rank*.txt"))
    assert outputs == ["ddp_ok_rank0.txt", "ddp_ok_rank1.txt"], result.stdout[-2000:]
    for name in outputs:  # both ranks finished and predicted every cell
        assert (tmp_path / name).read_text() == "300"

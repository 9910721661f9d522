"""Shared fixtures: small simulated data and the real-data switch."""

import os

os.environ.setdefault("MPLBACKEND", "Agg")

import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import scvi  # noqa: E402

from scvi_ext.data import datasets_available, simulate  # noqa: E402

requires_shared_data = pytest.mark.skipif(
    not datasets_available(), reason="../shared/datasets (or SCVI_EXT_DATA) is not available"
)


@pytest.fixture(autouse=True)
def _seed():
    scvi.settings.seed = 0
    yield


@pytest.fixture
def sim_adata():
    """Reference + query cells: query cells carry the label 'Unknown' in obs['labels']."""
    adata = simulate(n_cells=480, n_genes=100, n_cell_types=4, n_batches=2, n_markers=15, seed=1)
    labels = adata.obs["cell_type"].astype(str).to_numpy().copy()
    labels[(adata.obs["condition"] == "query").to_numpy()] = "Unknown"
    adata.obs["labels"] = labels
    return adata


def query_mask(adata) -> np.ndarray:
    """Cells of the query condition."""
    return (adata.obs["condition"] == "query").to_numpy()


# Each rank writes its own file: the ranks share stdout, so their prints can interleave.
_WRITE_RESULT = """
import os
with open(f"ddp_result_rank{os.environ.get('LOCAL_RANK', '0')}.txt", "w") as handle:
    handle.write(str(result))
"""


def ddp_rank_results(script: str, tmp_path: Path) -> list[str]:
    """Run ``script``, whose training uses two CPU DDP processes, in a subprocess.

    The script runs with the tests folder on ``sys.path`` (it can import the test modules)
    and assigns ``result`` on every rank. Returns ``str(result)`` of rank 0 and rank 1, after
    checking that the run succeeded and that both ranks got there.
    """
    tests = str(Path(__file__).parent)
    source = f"import sys\nsys.path.insert(0, {tests!r})\n{textwrap.dedent(script)}{_WRITE_RESULT}"
    path = tmp_path / "ddp_script.py"
    path.write_text(source)
    run = subprocess.run(
        [sys.executable, str(path)], capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr[-3000:]
    files = sorted(tmp_path.glob("ddp_result_rank*.txt"))
    names = [file.name for file in files]
    assert names == ["ddp_result_rank0.txt", "ddp_result_rank1.txt"], run.stdout[-2000:]
    return [file.read_text() for file in files]


def assert_trained_with_plain_adam(model, lr: float) -> None:
    """The model trained with Adam at ``lr``, Adam's own eps (1e-8, not scvi's 0.01), no
    weight decay, and kept its last epoch (``scvi_ext.base.PLAIN_ADAM_PLAN``)."""
    import torch

    optimizer = model.trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.Adam)
    group = optimizer.param_groups[0]
    assert (group["eps"], group["weight_decay"]) == (1e-8, 0.0)
    assert group["lr"] == pytest.approx(lr, rel=1e-9)  # a schedule may leave rounding
    assert model.trainer.lightning_module.restore_best_weights is False


def record_trained_adam_eps(monkeypatch, model_cls) -> list[float]:
    """Patch ``model_cls.train`` (and its subclasses') to append the Adam ``eps`` each
    training ran with to the list returned."""
    train, used = model_cls.train, []

    def recording_train(self, *args, **kwargs):
        out = train(self, *args, **kwargs)
        used.append(self.trainer.optimizers[0].param_groups[0]["eps"])
        return out

    monkeypatch.setattr(model_cls, "train", recording_train)
    return used


def inverse_frequency_weights(labels, label_names, power: float = 1.0) -> np.ndarray:
    """Each type's ``count ** -power`` among ``labels``, in ``label_names`` order, summing
    to 1."""
    inverse = labels.value_counts()[label_names].to_numpy().astype(float) ** -power
    return inverse / inverse.sum()


def assert_balanced_classes_weight_the_loss_refitted_per_train(
    model_cls, reference, query, model_kwargs: dict, balance: bool | str = True
) -> None:
    """``model_cls(..., balance_classes=balance)`` (a ``CrossEntropyModule``; ``True`` or
    ``"sqrt"``): the plain model keeps unit weights; the balanced one weighs each type by
    its inverse frequency (``True``) or its square root (``"sqrt"``) among the labelled
    cells (10 cells of one type here), its loss is torch's weighted cross-entropy, the
    weights are not saved but the choice is (a reloaded model keeps it) and, for a model
    with query mapping (``query`` not ``None``), they are refitted from the query's labels
    after ``load_query_data``."""
    import tempfile

    import torch
    import torch.nn.functional as F

    scvi.settings.seed = 0
    rare = (reference.obs["cell_type"] == sorted(set(reference.obs["cell_type"]))[0]).to_numpy()
    reference = reference[~rare | (np.cumsum(rare) <= 10)].copy()
    model_cls.setup_anndata(reference, labels_key="cell_type")
    plain = model_cls(reference, **model_kwargs)
    assert not plain.module.balance_classes
    plain.train(max_epochs=1, batch_size=32, enable_progress_bar=False)
    torch.testing.assert_close(plain.module.label_weights, torch.ones(plain.module.n_labels))
    power = {True: 1.0, "sqrt": 0.5}[balance]
    model = model_cls(reference, **model_kwargs, balance_classes=balance)
    model.train(max_epochs=1, batch_size=32, enable_progress_bar=False)
    expected = inverse_frequency_weights(reference.obs["cell_type"], model.label_names, power)
    np.testing.assert_allclose(model.module.label_weights.numpy(), expected, rtol=1e-6)
    tensors = next(iter(model.iter_minibatches()))
    outputs = model.module.inference(**model.module._get_inference_input(tensors))
    loss = model.module.loss(tensors, outputs, {}).loss
    labels = tensors["labels"].long().ravel()
    weights = model.module.label_weights
    torch.testing.assert_close(loss, F.cross_entropy(outputs["logits"], labels, weight=weights))
    assert "label_weights" not in model.module.state_dict()
    with tempfile.TemporaryDirectory() as folder:
        model.save(folder, overwrite=True)
        assert model_cls.load(folder, adata=reference).module.balance_classes == balance
    if query is None:
        return
    query_model = model_cls.load_query_data(query, model)
    assert query_model.module.balance_classes == balance
    query_model.train(max_epochs=1, batch_size=32, enable_progress_bar=False)
    expected = inverse_frequency_weights(query.obs["cell_type"], model.label_names, power)
    np.testing.assert_allclose(query_model.module.label_weights.numpy(), expected, rtol=1e-6)

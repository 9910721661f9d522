"""Several processes (DDP), devices and precision, for every model (issue 16).

- the rank helpers and :func:`scvi_ext.base.on_main_process` (a model is written once);
- CELLULAR and LatentClassifier under two-process CPU DDP (the other models' DDP tests are
  in their own files: grep ``ddp_rank_results``);
- logged validation loss under DDP = the cell-weighted mean over the ranks' cells;
- losses with cross-sample terms: the DDP gradient is the mean of the per-rank
  single-process gradients (not the gradient of the gathered batch);
- 2 processes match 1 process within seed noise on Kang;
- every model's training and validation steps on the meta device, and one epoch in
  ``bf16-mixed`` precision.
"""

from __future__ import annotations

import ast

import numpy as np
import pytest
import scvi
import torch
from conftest import ddp_rank_results, requires_shared_data
from scvi import REGISTRY_KEYS

from scvi_ext.base import global_rank, is_main_process, on_main_process
from scvi_ext.data import simulate

TRAIN = {"enable_progress_bar": False, "enable_model_summary": False}


# ---------------------------------------------------------------- rank helpers
def test_outside_ddp_this_is_rank_zero_and_on_main_process_just_runs():
    assert global_rank() == 0 and is_main_process()
    assert on_main_process(lambda a, b=0: a + b, 2, b=3) == 5
    with pytest.raises(ValueError, match="bad"):
        on_main_process(lambda: (_ for _ in ()).throw(ValueError("bad")))


#: Prepended to the DDP scripts: records the files each process writes.
RECORD_WRITES = """
# Record the files each process writes (models: torch.save; AnnData: write_h5ad).
import os

import anndata
import torch

writes = []
torch_save, write_h5ad = torch.save, anndata.AnnData.write_h5ad
torch.save = lambda obj, path, *args, **kwargs: (
    writes.append(os.path.basename(path)), torch_save(obj, path, *args, **kwargs)
)
anndata.AnnData.write_h5ad = lambda adata, path, *args, **kwargs: (
    writes.append(os.path.basename(path)), write_h5ad(adata, path, *args, **kwargs)
)
"""

SAVE_SCRIPT = (
    RECORD_WRITES
    + """
import os

import numpy as np
import scvi
import torch
import torch.nn.functional as F
from scvi import REGISTRY_KEYS

from test_contract import Toy, _simulated
from scvi_ext.base import global_rank

rank_before_training = global_rank()  # rank 1 knows it from the launcher's environment
scvi.settings.seed = 0
reference, query = _simulated()
Toy.setup_anndata(reference, labels_key="cell_type", batch_key="batch")
model = Toy(reference)
model.train(max_epochs=2, batch_size=16, train_size=0.9, enable_progress_bar=False,
            accelerator="cpu", devices=2, strategy="ddp",
            plan_kwargs={"restore_best_weights": False})
model.save("saved")  # every rank runs it: rank 0 writes, rank 1 waits for it
loaded = Toy.load("saved", adata=False)  # so that every rank reads a whole folder
same = bool(np.allclose(loaded.predict_proba(query), model.predict_proba(query), atol=1e-6))
try:
    model.save("saved")
    again = "saved twice"
except ValueError as error:  # scvi's error, on rank 0 and, sent from there, on rank 1
    again = "already exists" in str(error)

# The logged validation loss is the mean over the cells of both ranks: the distributed
# sampler gives each rank every other cell of the validation set, padded with its first
# cells to an even count.
validation = np.asarray(model.validation_indices)
padded = np.concatenate([validation, validation[: len(validation) % 2]])
model.module.eval()
with torch.no_grad():
    tensors = next(model.iter_minibatches(indices=padded, batch_size=len(padded)))
    logits = model.module.predict_logits(tensors)
    labels = tensors[REGISTRY_KEYS.LABELS_KEY].long().ravel()
    expected = float(F.cross_entropy(logits, labels))
logged = model.history["validation_loss"].to_numpy()[-1, 0] if global_rank() == 0 else None
known_rank = rank_before_training == global_rank() == int(os.environ.get("LOCAL_RANK", 0))
reduced = logged is None or abs(logged - expected) < 1e-5
result = (same, again, len(validation), reduced, known_rank, writes)
"""
)


def test_every_rank_saves_but_rank_zero_alone_writes_and_validation_loss_is_reduced(tmp_path):
    # 336 reference cells, 10%: 33 validation cells, so rank 1 gets one padded cell
    rank0, rank1 = ddp_rank_results(SAVE_SCRIPT, tmp_path)
    assert rank0 == "(True, True, 33, True, True, ['model.pt'])"
    assert rank1 == "(True, True, 33, True, True, [])"  # it waited, loaded, and wrote nothing
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["model.pt"]


CELLULAR_SCRIPT = (
    RECORD_WRITES
    + """
import hashlib

import numpy as np
import scvi

from test_distributed import _simulated_batches
from scvi_ext.model import CELLULAR, LatentClassifier

scvi.settings.seed = 0
reference, query = _simulated_batches()
CELLULAR.setup_anndata(reference, labels_key="cell_type", batch_key="batch")
ddp = {"accelerator": "cpu", "devices": 2, "strategy": "ddp", "enable_progress_bar": False}
cellular = CELLULAR(reference, n_latent=8, n_hidden=(32, 16))
cellular.train(max_epochs=10, batch_size=16, **ddp)  # 16 per rank: 32 per step
classifier = LatentClassifier.from_model(cellular, n_hidden1=16, n_hidden2=16)
classifier.train(max_epochs=10, batch_size=16, plan_kwargs={"warmup_epochs": 0}, **ddp)
predictions = classifier.predict(query)
classifier.save("classifier")  # the classifier, its upstream CELLULAR and stub, once
loaded = LatentClassifier.load("classifier")
same = bool((loaded.predict(query) == predictions).all())
accuracy = float((predictions == query.obs["cell_type"].to_numpy()).mean())
digest = hashlib.sha1(np.asarray(classifier.predict_proba(query)).round(5).tobytes())
result = (accuracy > 0.6, same, digest.hexdigest(), writes)
"""
)


def _simulated_batches():
    """Reference and query cells of 3 types in 2 batches (for the DDP scripts)."""
    adata = simulate(n_cells=400, n_genes=80, n_cell_types=3, n_batches=2, n_markers=12, seed=4)
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str)
    query = (adata.obs["condition"] == "query").to_numpy()
    return adata[~query].copy(), adata[query].copy()


def test_cellular_and_latent_classifier_train_under_ddp_and_both_ranks_agree(tmp_path):
    rank0, rank1 = map(ast.literal_eval, ddp_rank_results(CELLULAR_SCRIPT, tmp_path))
    assert rank0[:2] == (True, True)  # above chance (1/3); the same after save and load
    assert rank0[2] == rank1[2]  # the same probabilities on both ranks
    assert rank0[3] == ["model.pt", "model.pt", "adata.h5ad"]  # classifier, upstream, stub
    assert rank1[3] == []
    saved = {p.relative_to(tmp_path).as_posix() for p in (tmp_path / "classifier").rglob("*")}
    assert saved == {
        "classifier/model.pt",
        "classifier/upstream",
        "classifier/upstream.json",
        "classifier/upstream/model.pt",
        "classifier/upstream/adata.h5ad",
    }


# ---------------------------------------------------------------- 2 processes vs 1, Kang
#: Kang classifiers: small widths, 5 epochs; CAN at lr 1e-2 (its paper's 1e-4 needs 50).
KANG_EPOCHS, KANG_BATCH = 5, 128


def _kang_split():
    """1500 stratified training cells and the 475 others, on 500 top-variance genes."""
    from sklearn.model_selection import train_test_split

    from scvi_ext.data import load_dataset, select_genes

    adata = load_dataset("kang_ifnb")
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str)
    cells = np.arange(adata.n_obs)
    train, held_out = train_test_split(
        cells, train_size=1500, stratify=adata.obs["cell_type"], random_state=0
    )
    reference = select_genes(adata[train].copy(), "can", n_top_genes=500)
    return reference, adata[held_out, reference.var_names].copy()


def _kang_accuracies(seed: int, **trainer_kwargs) -> list[float]:
    """Held-out accuracy of ScNym, CAN and CELLULAR (nearest centroid) trained with ``seed``.

    With ``devices=2``, each process draws ``KANG_BATCH / 2`` cells per step: the gradient
    averaged over both is that of ``KANG_BATCH`` cells, as with one process.
    """
    from scvi_ext.model import CAN, CELLULAR, ScNym

    reference, held_out = _kang_split()
    n_processes = trainer_kwargs.get("devices", 1)
    settings = {"max_epochs": KANG_EPOCHS, "batch_size": KANG_BATCH // n_processes}
    settings.update(TRAIN, **trainer_kwargs)
    builders = {
        ScNym: ({"unlabeled_category": None}, {"n_hidden": 64}, None),
        CAN: (
            {},
            {"n_capsules": 8, "capsule_dim": 32, "attention_dim": 8, "kernel_size": 3},
            {"lr": 1e-2},
        ),
        CELLULAR: ({}, {"n_latent": 16, "n_hidden": (64, 32)}, None),
    }
    accuracies = []
    for model_cls, (setup, architecture, plan_kwargs) in builders.items():
        scvi.settings.seed = seed
        adata = reference.copy()
        model_cls.setup_anndata(adata, labels_key="cell_type", **setup)
        model = model_cls(adata, **architecture)
        model.train(plan_kwargs=plan_kwargs, **settings)
        predictions = model.predict(held_out)
        accuracies.append(float((predictions == held_out.obs["cell_type"].to_numpy()).mean()))
    return accuracies


KANG_SCRIPT = """
from test_distributed import _kang_accuracies

result = [round(a, 4) for a in _kang_accuracies(0, accelerator="cpu", devices=2, strategy="ddp")]
"""


@requires_shared_data
def test_two_processes_match_one_process_within_seed_noise_on_kang(tmp_path):
    one_process = np.array([_kang_accuracies(seed) for seed in (0, 1)])  # seeds x models
    results = ddp_rank_results(KANG_SCRIPT, tmp_path)
    assert results[0] == results[1]
    two_processes = np.array(ast.literal_eval(results[0]))
    mean, spread = one_process.mean(axis=0), np.abs(one_process[0] - one_process[1])
    print("1 process (seeds 0, 1):", one_process, "2 processes:", two_processes)
    assert (two_processes > 0.6).all()  # 7 types, the largest 32% of the cells
    assert (np.abs(two_processes - mean) <= np.maximum(3 * spread, 0.03)).all()


# ---------------------------------------------------------------- cross-sample losses
class _LossOf(torch.nn.Module):
    """``loss_of(module, tensors)`` as a module's forward, for DistributedDataParallel."""

    def __init__(self, module: torch.nn.Module, loss_of):
        super().__init__()
        self.module, self.loss_of = module, loss_of

    def forward(self, tensors: dict) -> torch.Tensor:
        return self.loss_of(self.module, tensors)


def _module_loss(module, tensors: dict) -> torch.Tensor:
    return module(tensors)[2].loss


def _scnym_mixmatch_loss(module, tensors: dict) -> torch.Tensor:
    """ScNym's loss with the plan's MixUp, mixing cells of the same (per-rank) minibatch."""
    x = module.normalize(tensors[REGISTRY_KEYS.X_KEY])
    labels = tensors[REGISTRY_KEYS.LABELS_KEY].long().ravel()
    labelled = (labels < module.n_labels)[:, None]
    one_hot = torch.nn.functional.one_hot(labels.clamp(max=module.n_labels - 1), module.n_labels)
    targets = torch.where(labelled, one_hot.float(), tensors["pseudolabels"])
    partner = torch.arange(len(x)).flip(0)
    loss_kwargs = {
        "mixed_input": 0.7 * x + 0.3 * x[partner],
        "mixed_targets": 0.7 * targets + 0.3 * targets[partner],
        "unsup_weight": 1.0,
        "adversary_weight": 0.1,
    }
    return module(tensors, loss_kwargs=loss_kwargs)[2].loss


def _cross_sample_cases(n_cells: int = 32) -> dict:
    """``{name: (module, loss_of, minibatch)}``: losses whose terms pair cells of a minibatch.

    Seeded, so that every process builds the same. Dropout is off: the processes' and the
    test's random draws differ.
    """
    from scvi_ext.cellular import CELLULARModule
    from scvi_ext.matching import CrossAttentionModule
    from scvi_ext.scnym import ScNymModule

    generator = torch.Generator().manual_seed(0)
    n_genes, n_peaks, n_labels = 30, 40, 3
    minibatch = {
        REGISTRY_KEYS.X_KEY: torch.poisson(
            5 * torch.rand(n_cells, n_genes, generator=generator), generator
        ),
        REGISTRY_KEYS.ATAC_X_KEY: 1.0 + (torch.rand(n_cells, n_peaks, generator=generator) < 0.3),
        REGISTRY_KEYS.LABELS_KEY: torch.randint(
            0, n_labels + 1, (n_cells, 1), generator=generator
        ),
        REGISTRY_KEYS.BATCH_KEY: torch.randint(0, 2, (n_cells, 1), generator=generator),
        "pseudolabels": torch.rand(n_cells, n_labels, generator=generator).softmax(dim=1),
    }
    torch.manual_seed(0)
    cellular = CELLULARModule(n_genes, n_labels, n_batch=2, n_latent=4, n_hidden=(8,))
    cellular.encoder.layers.apply(lambda layer: setattr(layer, "p", 0.0))  # dropout off
    cellular.library_size.fill_(100.0)
    cellular.label_weights.fill_(1.0 / n_labels)
    cellular.batch_weights.fill_(0.5)
    cellular.reference_distances.copy_(torch.tensor([[0, 1, 0.5], [1, 0, 0.8], [0.5, 0.8, 0]]))
    scnym = ScNymModule(n_genes, n_labels, n_batch=2, n_hidden=8, dropout_rate=0.0)
    small = {"n_filters": 4, "kernel_size_atac": 8, "n_tokens_rna": 4, "n_tokens_atac": 4}
    small |= {"embed_dim": 8, "n_heads": 2, "dropout": 0.0}
    orders = {"gene_order": np.arange(n_genes), "peak_order": np.arange(n_peaks)}
    infonce = CrossAttentionModule(n_genes, n_peaks, **orders, **small, alpha=0.0,
                                   objective="infonce")  # fmt: skip
    triplet = CrossAttentionModule(n_genes, n_peaks, **orders, **small, n_hard_candidates=4)
    return {
        "cellular": (cellular, _module_loss, minibatch),
        "scnym_mixmatch": (scnym, _scnym_mixmatch_loss, minibatch),
        "matcher_infonce": (infonce, _module_loss, minibatch),
        "matcher_triplet": (triplet, _module_loss, minibatch),
    }


def _halves(minibatch: dict) -> list[dict]:
    """The two processes' minibatches: the first and the second half of the cells."""
    n_half = len(minibatch[REGISTRY_KEYS.X_KEY]) // 2
    return [{k: v[:n_half] for k, v in minibatch.items()}, {k: v[n_half:] for k, v in minibatch.items()}]  # fmt: skip


def _gradient(module, loss_of, tensors: dict) -> torch.Tensor:
    """Gradient of ``loss_of`` with respect to every parameter, flattened (zeros if unused)."""
    import copy

    module = copy.deepcopy(module)
    loss_of(module, tensors).backward()
    return torch.cat(
        [torch.zeros(p.numel()) if p.grad is None else p.grad.ravel() for p in module.parameters()]
    )


GRADIENT_SCRIPT = """
import torch
from lightning.fabric import Fabric

from test_distributed import _LossOf, _cross_sample_cases, _halves

fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp")
fabric.launch()
gradients = {}
for name, (module, loss_of, minibatch) in _cross_sample_cases().items():
    wrapped = fabric.setup_module(_LossOf(module, loss_of))
    fabric.backward(wrapped(_halves(minibatch)[fabric.global_rank]))
    gradients[name] = torch.cat([
        torch.zeros(p.numel()) if p.grad is None else p.grad.ravel() for p in module.parameters()
    ])
torch.save(gradients, f"gradients_rank{fabric.global_rank}.pt")
result = sorted(gradients)
"""


def test_ddp_gradient_of_cross_sample_losses_is_the_mean_of_per_rank_gradients(tmp_path):
    """Each process computes CELLULAR's contrastive and centroid terms, ScNym's MixUp and the
    matcher's InfoNCE / hardest-negative triplet on its own cells; DDP averages the
    gradients. That is single-process training on the per-rank minibatch with two
    minibatches' gradients averaged, and not the loss of the gathered minibatch."""
    cases = _cross_sample_cases()
    assert ddp_rank_results(GRADIENT_SCRIPT, tmp_path) == [str(sorted(cases))] * 2
    on_rank = [torch.load(tmp_path / f"gradients_rank{rank}.pt") for rank in (0, 1)]
    for name, (module, loss_of, minibatch) in cases.items():
        per_rank = [_gradient(module, loss_of, half) for half in _halves(minibatch)]
        expected = (per_rank[0] + per_rank[1]) / 2
        torch.testing.assert_close(on_rank[0][name], expected, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(on_rank[1][name], on_rank[0][name])
        gathered = _gradient(module, loss_of, minibatch)  # the loss of all 32 cells at once
        relative = (gathered - expected).norm() / expected.norm()
        print(f"{name}: |gathered - per rank| / |per rank| = {relative:.3f}")
        assert relative > 0.01, name  # the cross-sample terms make them differ


# ---------------------------------------------------------------- devices and precision
def _meta_minibatch(n_cells: int, n_genes: int, label: int, n_peaks: int = 0) -> dict:
    minibatch = {
        REGISTRY_KEYS.X_KEY: torch.ones(n_cells, n_genes, device="meta"),
        REGISTRY_KEYS.BATCH_KEY: torch.zeros(n_cells, 1, dtype=torch.long, device="meta"),
        REGISTRY_KEYS.LABELS_KEY: torch.full((n_cells, 1), label, device="meta"),
    }
    if n_peaks:
        minibatch[REGISTRY_KEYS.ATAC_X_KEY] = torch.ones(n_cells, n_peaks, device="meta")
    return minibatch


def _meta_plan(name: str):
    """(training plan of model ``name`` with a small module, number of peaks it reads)."""
    from scvi_ext.base import BaseTrainingPlan
    from scvi_ext.can import CANModule
    from scvi_ext.cgran import CGRANModule
    from scvi_ext.gmvae import GMVAEModule, GMVAETrainingPlan
    from scvi_ext.matching import CrossAttentionModule

    cgran = {"n_embedding": 8, "n_heads": 2, "head_dims": (4, 2), "group_size": 5}
    matcher = {"n_filters": 4, "kernel_size_atac": 8, "n_tokens_rna": 4, "n_tokens_atac": 4}
    matcher |= {"embed_dim": 8, "n_heads": 2, "gene_order": np.arange(20)}
    matcher |= {"peak_order": np.arange(40)}
    plans = {
        "can": lambda: CANModule(
            20, 3, n_capsules=4, capsule_dim=8, attention_dim=4, kernel_size=3
        ),
        "cgran_full": lambda: CGRANModule(20, 3, attention="full", **cgran),
        "cgran_full_fused": lambda: CGRANModule(
            20, 3, attention="full", full_implementation="fused", **cgran
        ),
        "cgran_local_dense": lambda: CGRANModule(20, 3, local_implementation="dense", **cgran),
        "cgran_local_factorised": lambda: CGRANModule(20, 3, **cgran),
        "cgran_local_grouped": lambda: CGRANModule(20, 3, local_implementation="grouped", **cgran),
        "matcher_triplet": lambda: CrossAttentionModule(20, 40, n_hard_candidates=2, **matcher),
        "matcher_infonce": lambda: CrossAttentionModule(
            20, 40, alpha=0.0, objective="infonce", **matcher
        ),
        "matcher_linear": lambda: CrossAttentionModule(
            20,
            40,
            alpha=0.0,
            objective="infonce",
            atac_input="gene_activity",
            links=np.stack([np.arange(40) % 20, np.arange(40)], 1),
            shared_encoder=True,
            encoder="linear",
            **matcher,
        ),
    }
    if name == "gmvae":
        module = GMVAEModule(20, n_batch=2, n_latent=4, n_hidden=8, n_components=3)
        return GMVAETrainingPlan(module, n_epochs_kl_warmup=5), 0
    return BaseTrainingPlan(plans[name]()), 40 if name.startswith("matcher") else 0


@pytest.mark.parametrize(
    "name",
    [
        "can",
        "cgran_full",
        "cgran_full_fused",
        "cgran_local_dense",
        "cgran_local_factorised",
        "cgran_local_grouped",
        "gmvae",
        "matcher_triplet",
        "matcher_infonce",
        "matcher_linear",
    ],
)
def test_plan_steps_of_every_model_run_on_the_modules_device(name):
    # The meta device stands in for a GPU (as in test_base.py, which covers ScNym, CELLULAR
    # and LatentClassifier): a tensor made on the CPU in a step, an .item()/float() of a
    # device tensor or a boolean-mask index raises there, each a device mismatch or a wait
    # for the GPU in every step.
    plan, n_peaks = _meta_plan(name)
    plan = plan.to("meta")
    loss = plan.training_step(_meta_minibatch(4, 20, 1, n_peaks), 0)
    assert loss.device.type == "meta" and loss.shape == ()
    plan.validation_step(_meta_minibatch(4, 20, 0, n_peaks), 0)


def _small_model(name: str):
    """(untrained model ``name`` with small widths on simulated data, its plan_kwargs)."""
    from test_gmvae import SMALL as GMVAE_SMALL
    from test_matching import SMALL as MATCHER_SMALL
    from test_model_contract_safety import BUILDERS, TEST_PLAN_KWARGS, _data

    from scvi_ext.gmvae import GMVAE
    from scvi_ext.matching import CrossAttentionMatcher, simulate_paired

    if name == "gmvae":
        reference, _ = _data()
        GMVAE.setup_anndata(reference, batch_key="batch")
        return GMVAE(reference, **GMVAE_SMALL), {"lr": 3e-3}
    if name == "matcher":
        mdata = simulate_paired(n_cells=200)
        CrossAttentionMatcher.setup_mudata(mdata)
        return CrossAttentionMatcher(mdata, **MATCHER_SMALL), None
    return BUILDERS[name](_data()[0]), TEST_PLAN_KWARGS.get(name)


@pytest.mark.parametrize("name", ["scnym", "gmvae"])
def test_outputs_read_minibatches_on_the_device_of_a_model_trained_elsewhere(name):
    # a model trained on a GPU stays there: every per-cell output (GMVAE's latent called
    # its encoder on CPU tensors, found on an H200) gets its minibatches on that device
    model, plan_kwargs = _small_model(name)
    model.train(max_epochs=1, batch_size=64, plan_kwargs=plan_kwargs, **TRAIN)
    model.module.to("meta")  # stands in for the GPU
    devices = set()

    def fn(tensors: dict) -> torch.Tensor:
        devices.update(v.device.type for v in tensors.values() if isinstance(v, torch.Tensor))
        return torch.zeros(len(tensors[REGISTRY_KEYS.X_KEY]))

    assert len(model.map_minibatches(fn)) == model.adata.n_obs
    assert devices == {"meta"}


def test_outputs_before_training_has_ended_only_when_asked():
    # a training callback (the gmvae_components study's) reads outputs while training
    model, _ = _small_model("gmvae")
    with pytest.raises(RuntimeError, match="is not trained; call model.train"):
        model.map_minibatches(model.module.latent)
    model.module.train()
    latent = model.map_minibatches(model.module.latent, while_training=True)
    assert latent.shape == (model.adata.n_obs, 8)
    assert model.module.training  # its mode is restored


@pytest.mark.parametrize(
    "name", ["scnym", "cellular", "latent_classifier", "can", "cgran", "gmvae", "matcher"]
)
def test_every_model_trains_in_bf16_mixed_precision_on_the_cpu(name):
    losses = {}
    for precision in ("32-true", "bf16-mixed"):
        scvi.settings.seed = 0
        model, plan_kwargs = _small_model(name)
        model.train(
            max_epochs=1, batch_size=64, precision=precision, plan_kwargs=plan_kwargs, **TRAIN
        )
        losses[precision] = float(model.history["train_loss"].to_numpy()[-1, 0])
        assert next(model.module.parameters()).dtype == torch.float32  # the weights stay fp32
    # bfloat16 keeps 8 bits of mantissa: the epoch's loss moves by < 1% (measured: < 0.5%)
    assert np.isfinite(losses["bf16-mixed"])
    assert losses["bf16-mixed"] != losses["32-true"]  # the steps did run in bfloat16
    assert losses["bf16-mixed"] == pytest.approx(losses["32-true"], rel=0.01)

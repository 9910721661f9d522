"""Every model on a CUDA GPU (issue 16): it trains there, its outputs are computed there,
a model saved from the GPU loads on the CPU with the same outputs, and bf16 mixed
precision trains there. Skipped without a CUDA device (CI has none): run
``pytest tests/test_gpu.py`` on a machine with one. The meta-device tests of
``test_distributed.py`` check the device placement of the steps on every machine.
"""

import numpy as np
import pytest
import scvi
import torch
from test_distributed import TRAIN, _small_model
from test_model_contract_safety import _data

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

NAMES = ["scnym", "cellular", "latent_classifier", "can", "cgran", "gmvae", "matcher"]
GPU = {"accelerator": "gpu", "devices": 1}


def _outputs(model, name: str) -> np.ndarray:
    """What a user reads off the model: class probabilities, or the latent space(s)."""
    if name == "matcher":
        return np.concatenate(
            [model.get_latent_representation(modality=m) for m in ("rna", "atac")], axis=1
        )
    if name in ("cellular", "gmvae"):
        return model.get_latent_representation()
    return model.predict(soft=True).to_numpy()


@pytest.mark.parametrize("name", NAMES)
def test_every_model_trains_on_the_gpu_and_its_saved_model_loads_on_the_cpu(name, tmp_path):
    model, plan_kwargs = _small_model(name)
    model.train(max_epochs=2, batch_size=64, plan_kwargs=plan_kwargs, **GPU, **TRAIN)
    assert model.device.type == "cuda"
    assert all(p.device.type == "cuda" for p in model.module.parameters())
    assert np.isfinite(model.history["train_loss"].to_numpy(dtype=float)).all()
    on_gpu = _outputs(model, name)
    assert np.isfinite(on_gpu).all()

    model.save(tmp_path / "model")
    # the user's data again (LatentClassifier keeps a light copy of it, without counts)
    data = model.adata if name == "matcher" else _data()[0]
    loaded = type(model).load(tmp_path / "model", adata=data, accelerator="cpu")
    assert loaded.device.type == "cpu"
    # cuDNN convolutions (CAN, the matcher) may run in TF32 on the GPU
    np.testing.assert_allclose(_outputs(loaded, name), on_gpu, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("name", NAMES)
def test_every_model_trains_in_bf16_mixed_precision_on_the_gpu(name):
    losses, dtypes = {}, {}
    for run in ("32-true", "32-true again", "bf16-mixed"):
        scvi.settings.seed = 0
        model, plan_kwargs = _small_model(name)
        precision = run.split()[0]
        seen = dtypes[run] = set()  # output dtypes of the linear layers in training
        for module in model.module.modules():
            if isinstance(module, torch.nn.Linear):
                module.register_forward_hook(lambda *args, seen=seen: seen.add(args[-1].dtype))
        model.train(
            max_epochs=1,
            batch_size=64,
            precision=precision,
            plan_kwargs=plan_kwargs,
            **GPU,
            **TRAIN,
        )
        losses[run] = float(model.history["train_loss"].to_numpy()[-1, 0])
        assert next(model.module.parameters()).dtype == torch.float32
        assert model.trainer.precision == precision
    # the linear layers ran in float32, and in bfloat16 under bf16-mixed
    assert dtypes["32-true"] == dtypes["32-true again"] == {torch.float32}, dtypes
    assert torch.bfloat16 in dtypes["bf16-mixed"], dtypes
    fp32, bf16 = losses["32-true"], losses["bf16-mixed"]
    noise = abs(losses["32-true again"] - fp32)  # GPU kernels need not be deterministic
    print(f"{name}: bf16 vs fp32 {abs(bf16 - fp32) / fp32:.3%}, fp32 vs fp32 {noise / fp32:.3%}")
    assert np.isfinite(bf16)
    # the epoch's loss moves by at most 2% (3x the run-to-run noise if larger)
    assert bf16 == pytest.approx(fp32, rel=0.02, abs=3 * noise)

"""Resumable training: a Lightning checkpoint of the whole training state every epoch."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from scvi.train import SaveCheckpoint

CHECKPOINT_SUFFIX = ".ckpt"


class EpochCheckpoint(SaveCheckpoint):
    """Lightning's checkpoint of weights, optimizer, scheduler and epoch, kept for the latest epoch.

    A plain :class:`~lightning.pytorch.callbacks.ModelCheckpoint` (one ``epoch=N.ckpt``
    file, replaced every epoch). It subclasses scvi's :class:`~scvi.train.SaveCheckpoint`
    only so that scvi's ``Trainer`` accepts it as the checkpoint callback and adds no
    model folders of its own; none of ``SaveCheckpoint``'s saving is used.

    Parameters
    ----------
    dirpath
        Folder of the checkpoint.
    """

    def __init__(self, dirpath: str | Path):
        ModelCheckpoint.__init__(self, dirpath=str(dirpath), filename="{epoch}", save_top_k=1)
        self.load_best_on_end = False
        self.loss_is_nan = False
        self.check_nan_gradients = False

    on_save_checkpoint = ModelCheckpoint.on_save_checkpoint
    _remove_checkpoint = ModelCheckpoint._remove_checkpoint
    _update_best_and_save = ModelCheckpoint._update_best_and_save


def latest_checkpoint(checkpoint_dir: str | Path) -> Path:
    """The most recent checkpoint written by :class:`EpochCheckpoint` in ``checkpoint_dir``.

    Raises
    ------
    ValueError
        The folder holds no checkpoint.
    """
    paths = sorted(
        Path(checkpoint_dir).glob(f"*{CHECKPOINT_SUFFIX}"), key=lambda p: p.stat().st_mtime
    )
    if not paths:
        raise ValueError(
            f"No checkpoint to resume from in {checkpoint_dir}; train once with "
            "checkpoint_dir=... (and resume=False) first."
        )
    return paths[-1]

from collections.abc import Mapping, Sequence
from numbers import Number

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score


def novelty_auroc(is_novel: Sequence[bool], score: Sequence[float]) -> float:
    """Area under the ROC curve of a per-cell novelty score.

    Parameters
    ----------
    is_novel
        Whether each cell belongs to a type unseen in the reference.
    score
        Novelty score, higher meaning more likely novel (e.g. ``1 - confidence`` or
        the negative normalised likelihood).

    Returns
    -------
    The AUROC: 0.5 is chance, 1.0 ranks every novel cell above every known one.

    Raises
    ------
    ValueError
        When ``is_novel`` holds anything but booleans or 0/1 (see ``_as_flags``), the
        shapes differ, ``score`` has NaN values or ``is_novel`` has one class only.
    """
    is_novel = _as_flags(is_novel, "is_novel")
    score = np.asarray(score, dtype=np.float64)
    if is_novel.shape != score.shape or is_novel.ndim != 1:
        raise ValueError(
            "is_novel and score must be one-dimensional with the same length; got "
            f"shapes {is_novel.shape} and {score.shape}."
        )
    if np.isnan(score).any():
        raise ValueError("score contains NaN values.")
    if is_novel.all() or not is_novel.any():
        raise ValueError(
            "novelty_auroc needs both novel and known cells; is_novel has only one class."
        )
    return float(roc_auc_score(is_novel, score))


def _as_flags(values: Sequence | np.ndarray | pd.Series, name: str) -> np.ndarray:
    """``values`` as a boolean array; only booleans or the numbers 0 and 1 are accepted.

    Raises
    ------
    ValueError
        Naming ``name``, for strings (e.g. ``"False"`` read from a file, which ``bool``
        would take as true), missing values and numbers other than 0 and 1.
    """
    array = values.to_numpy() if isinstance(values, pd.Series) else np.asarray(values)
    if array.dtype == object and all(isinstance(v, Number | np.bool_) for v in array.flat):
        array = array.astype(np.float64)  # Python bools or numbers in a pandas object column
    if array.dtype.kind == "b":
        return array
    strings = (
        [v for v in array.flat if isinstance(v, str | bytes)] if array.dtype.kind in "OSU" else []
    )
    if strings:
        raise ValueError(
            f"{name} must be booleans (or 0/1), not strings such as {str(strings[0])!r}; convert "
            "them first, e.g. with == 'True'."
        )
    n_missing = int(pd.isna(array).sum()) if array.dtype.kind in "fO" else 0
    if n_missing:
        raise ValueError(
            f"{name} must be booleans (or 0/1); it has {n_missing} missing values (NaN or "
            "None). Give each entry True or False."
        )
    if array.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be booleans (or 0/1), not values of dtype {array.dtype}.")
    other = array[~np.isin(array, (0, 1))]
    if other.size:
        raise ValueError(f"{name} must be booleans (or 0/1); found {other.flat[0].item()!r}.")
    return array.astype(bool)


def _as_series(values: Mapping | Sequence, name: str) -> pd.Series:
    if isinstance(values, pd.Series):
        return values
    if isinstance(values, Mapping):
        return pd.Series(dict(values), name=name)
    return pd.Series(np.asarray(values), name=name)


def novelty_precision_coverage(
    dataset_scores: Mapping[str, float] | Sequence[float],
    has_novel: Mapping[str, bool] | Sequence[bool],
    threshold: float = 0.25,
) -> dict[str, float]:
    """Dataset-level novelty detection of the CELLULAR thesis.

    A dataset is flagged as containing a novel cell type when its score (the minimum
    normalised likelihood over its cells) is below ``threshold``.

    Parameters
    ----------
    dataset_scores
        Score per dataset, as an array-like or a mapping from dataset name to score.
    has_novel
        Whether each dataset truly contains a novel type; same order as
        ``dataset_scores``, or a mapping with the same dataset names.
    threshold
        Datasets scoring below it are flagged.

    Returns
    -------
    Dict with ``precision`` (fraction of flagged datasets that have a novel type; NaN
    when none is flagged), ``coverage`` (fraction of datasets with a novel type that
    are flagged; NaN when none has one), ``n_flagged``, ``n_novel`` and
    ``n_datasets``.

    Raises
    ------
    ValueError
        When the datasets differ, ``dataset_scores`` has NaN values or ``has_novel`` holds
        anything but booleans or 0/1 (see ``_as_flags``).
    """
    scores = _as_series(dataset_scores, "score")
    truth = _as_series(has_novel, "has_novel")
    if isinstance(dataset_scores, Mapping | pd.Series) and isinstance(
        has_novel, Mapping | pd.Series
    ):
        if set(scores.index) != set(truth.index):
            raise ValueError(
                "dataset_scores and has_novel must name the same datasets; differences: "
                f"{sorted(map(str, set(scores.index) ^ set(truth.index)))}."
            )
        truth = truth.loc[scores.index]
    elif len(scores) != len(truth):
        raise ValueError(
            "dataset_scores and has_novel must have the same length; got "
            f"{len(scores)} and {len(truth)}."
        )
    score_values = scores.to_numpy(dtype=np.float64)
    if np.isnan(score_values).any():
        raise ValueError("dataset_scores contains NaN values.")
    truth_values = _as_flags(truth, "has_novel")
    flagged = score_values < threshold
    n_flagged = int(flagged.sum())
    n_novel = int(truth_values.sum())
    n_hits = int((flagged & truth_values).sum())
    return {
        "precision": n_hits / n_flagged if n_flagged else float("nan"),
        "coverage": n_hits / n_novel if n_novel else float("nan"),
        "n_flagged": float(n_flagged),
        "n_novel": float(n_novel),
        "n_datasets": float(len(score_values)),
    }

"""The ``setup_anndata`` steps the models share: checks at the door, then scvi's fields."""

from __future__ import annotations

from collections.abc import Sequence

from anndata import AnnData
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager
from scvi.data.fields import (
    BaseAnnDataField,
    CategoricalObsField,
    LabelsWithUnlabeledObsField,
    LayerField,
)
from scvi.utils import setup_anndata_dsp

from scvi_ext.data import validate_counts, validate_labels, validate_obs_key

from ._anndata import registry_label_names

# Docstring fragments of the models' setup_anndata (``%(param_cell_types)s``, ...).
setup_anndata_dsp.params.update(
    {
        "param_cell_types": "labels_key\n    ``obs`` column of cell type names. Cells labelled "
        "``unlabeled_category`` are\n    unlabeled: the query, left out of supervised terms.",
        "param_unlabeled_or_none": "unlabeled_category\n    Label of unlabeled cells; it must "
        "occur in the column. ``None``: every\n    cell is labelled.",
    }
)

#: Setup arguments ending in ``_key`` that are not ``obs`` columns checked by name here.
_NOT_OBS_COLUMNS = ("labels_key", "obsm_key")

#: Names tried, in order, for the unlabeled category of a fully labelled AnnData.
_FREE_UNLABELED_NAMES = ("Unknown", "unlabeled", "_scvi_ext_unlabeled")


def setup_anndata_method(function):
    """Decorator of a model's ``setup_anndata``: a classmethod whose docstring takes scvi's
    ``setup_anndata_dsp`` fragments (``%(param_adata)s``) and ours (``%(param_cell_types)s``,
    ``%(param_unlabeled_or_none)s``)."""
    return classmethod(setup_anndata_dsp.dedent(function))


def resolve_unlabeled_category(
    adata: AnnData, labels_key: str, unlabeled_category: str | None
) -> str:
    """The unlabeled category to register.

    ``None`` means every cell is labelled: the first of ``"Unknown"``, ``"unlabeled"`` that
    no cell carries. A category given by name must occur in the labels column: an absent
    one would leave the query cells labelled, and their label trained as a cell type.
    """
    if labels_key not in adata.obs:
        validate_obs_key(adata, labels_key, "labels_key")  # names the available columns
    labels = set(adata.obs[labels_key].dropna().astype(str))
    if unlabeled_category is None:
        return next(name for name in _FREE_UNLABELED_NAMES if name not in labels)
    if str(unlabeled_category) not in labels:
        examples = sorted(labels)[:8]
        raise ValueError(
            f"unlabeled_category '{unlabeled_category}' is not a value of "
            f"adata.obs['{labels_key}'] (values include {examples}). Pass the label your "
            "unlabeled (query) cells carry, or unlabeled_category=None when every cell is "
            "labelled."
        )
    return unlabeled_category


def register_labelled_anndata(
    cls,
    adata: AnnData,
    setup_method_args: dict,
    fields: Sequence[BaseAnnDataField] = (),
    x_field: BaseAnnDataField | None = None,
    **kwargs,
) -> None:
    """Check and register the counts (or ``x_field``), labels and ``fields`` for ``cls``.

    The arguments of the model's ``setup_anndata`` are read from ``setup_method_args``:
    ``labels_key``, ``unlabeled_category``, ``layer`` and every other ``*_key`` but
    ``obsm_key`` (an ``obs`` column, checked by name). Checks the counts
    (:func:`~scvi_ext.data.validate_counts`; not with ``x_field``, a field of other values
    registered in their place), the labels and unlabeled category (a new reference only:
    query mapping and loading pass ``source_registry``) and those columns, then registers
    the counts, the labels and ``fields``. ``setup_method_args`` records the resolved
    unlabeled category, so loading and query mapping use the same one.
    """
    setup_args = setup_method_args["setup_args"]
    labels_key, layer = setup_args["labels_key"], setup_args.get("layer")
    source_registry = kwargs.get("source_registry")
    if x_field is None:
        validate_counts(adata, layer)
        x_field = LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=True)
    if source_registry is None:
        unlabeled_category = resolve_unlabeled_category(
            adata, labels_key, setup_args.get("unlabeled_category")
        )
        validate_labels(adata, labels_key, unlabeled_category)
    else:
        unlabeled_category = registry_label_names(source_registry)[1]
    for role, key in setup_args.items():
        if role.endswith("_key") and role not in _NOT_OBS_COLUMNS and key is not None:
            validate_obs_key(adata, key, role)
    setup_args["unlabeled_category"] = unlabeled_category
    all_fields = [
        x_field,
        LabelsWithUnlabeledObsField(REGISTRY_KEYS.LABELS_KEY, labels_key, unlabeled_category),
        *fields,
    ]
    adata_manager = AnnDataManager(fields=all_fields, setup_method_args=setup_method_args)
    adata_manager.register_fields(adata, **kwargs)
    cls.register_manager(adata_manager)


class LabelledCountsSetupMixin:
    """``setup_anndata`` of a classifier of raw counts with no batch covariate (CAN,
    CGRAN): counts, cell type labels and one constant batch, the field scvi's query
    mapping and :func:`scvi_ext.interpret.saliency` read."""

    @setup_anndata_method
    def setup_anndata(
        cls,
        adata: AnnData,
        labels_key: str,
        unlabeled_category: str | None = None,
        layer: str | None = None,
        **kwargs,
    ) -> None:
        """Register raw counts and cell type labels.

        Parameters
        ----------
        %(param_adata)s
        %(param_cell_types)s
        %(param_unlabeled_or_none)s
        %(param_layer)s
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        batch_field = CategoricalObsField(REGISTRY_KEYS.BATCH_KEY, None)
        register_labelled_anndata(cls, adata, setup_method_args, [batch_field], **kwargs)

"""New cells' batches, checked against the batches a model was trained on."""

from __future__ import annotations

from anndata import AnnData
from scvi import REGISTRY_KEYS


def check_known_batches(
    adata: AnnData, registry: dict, model_name: str, reads_batch: bool = True
) -> None:
    """The ``batch_key`` column of new cells holds only batches the model was trained on.

    For models whose network reads each cell's batch when it predicts or embeds: a cell of
    a batch the model does not know has no weights to read, so it is mapped with the
    model's ``load_query_data`` first (scArches). For every model, at ``load``: the cells
    become the model's own data, registered with its batches. Nothing is checked when the
    model was set up without a ``batch_key``.

    Parameters
    ----------
    adata
        The new cells.
    registry
        The model's registry (``model.registry_``, or ``load_registry`` of a saved model).
    model_name
        The model's class name, for the messages.
    reads_batch
        The network reads the batch at inference (else the message points to inference
        on the new cells, which ignores their batches).

    Raises
    ------
    ValueError
        When the column is missing, has missing (NaN) values or batches the model was not
        trained on.
    """
    batch_key = registry["setup_args"].get("batch_key")
    if batch_key is None:
        return
    state = registry["field_registries"][REGISTRY_KEYS.BATCH_KEY]["state_registry"]
    known = [str(name) for name in state["categorical_mapping"]]
    query_hint = (
        f"map cells of new batches first (query_model = {model_name}.load_query_data(adata, "
        "model); query_model.train()) and use query_model"
    )
    if not reads_batch:
        query_hint = (
            f"load the model without them (adata=False) and pass them to its inference "
            f"(model.predict(adata), model.get_latent_representation(adata)), which does not "
            f"read batches, or {query_hint}"
        )
    if batch_key not in adata.obs:
        raise ValueError(
            f"adata.obs has no column '{batch_key}' (the batch_key of this {model_name}), "
            f"which the model reads for each cell. Add it with the cells' batches (the "
            f"model's: {known[:10]}), or {query_hint}."
        )
    values = adata.obs[batch_key]
    n_missing = int(values.isna().sum())
    if n_missing:
        raise ValueError(
            f"adata.obs['{batch_key}'] (the batch_key of this {model_name}) has {n_missing} "
            "missing (NaN) values; fill them with the cells' batches or remove those cells."
        )
    unknown = sorted(set(values.astype(str)) - set(known))
    if unknown:
        raise ValueError(
            f"adata.obs['{batch_key}'] has batches this {model_name} was not trained on "
            f"({unknown[:5]}; its batches: {known[:10]}): {query_hint}."
        )

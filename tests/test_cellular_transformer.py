"""CELLULAR token encoders (thesis Models 2 and 3) and attention rollout."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import scvi
import torch

from scvi_ext.cellular import CELLULAR
from scvi_ext.cellular._transformer import GeneSetTokenizer, GeneTokenizer, read_gmt
from scvi_ext.data import simulate
from scvi_ext.interpret import attention_rollout, rollout

TRAIN = {"enable_progress_bar": False, "enable_model_summary": False}
SMALL = {"n_latent": 8, "d_model": 16, "n_heads": 2, "n_layers": 2}


# ---------------------------------------------------------------------- rollout
def test_rollout_matches_hand_computed_two_layers():
    # layer 1: head means [[0, .5, .5], [1, 0, 0], [0, 0, 1]]; + I, row-normalised:
    #   A1 = [[.5, .25, .25], [.5, .5, 0], [0, 0, 1]]
    # layer 2: both heads [[0, 1, 0], [0, 1, 0], [0, 0, 1]]; + I, row-normalised:
    #   A2 = [[.5, .5, 0], [0, 1, 0], [0, 0, 1]]
    # rollout A2 @ A1, class row: .5 * [.5, .25, .25] + .5 * [.5, .5, 0] = [.5, .375, .125]
    layer1 = torch.tensor(
        [
            [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]],
            [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]],
        ]
    )
    layer2 = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]] * 2)
    raw = rollout([layer1, layer2], normalize=False)
    torch.testing.assert_close(raw, torch.tensor([0.375, 0.125]))
    torch.testing.assert_close(rollout([layer1, layer2]), torch.tensor([0.75, 0.25]))
    # batched (cells, heads, tokens, tokens): a second cell with uniform attention
    uniform = torch.full((2, 3, 3), 1.0 / 3)
    batched = rollout([torch.stack([layer1, uniform]), torch.stack([layer2, uniform])])
    torch.testing.assert_close(batched, torch.tensor([[0.75, 0.25], [0.5, 0.5]]))
    with pytest.raises(ValueError, match="at least one layer"):
        rollout([])
    with pytest.raises(ValueError, match="tokens, tokens"):
        rollout([torch.ones(2, 3, 4)])


# ---------------------------------------------------------------------- tokenizers
def test_gene_tokens_bin_expression_between_reference_range():
    tokenizer = GeneTokenizer(np.eye(3, dtype=np.float32), d_model=3, n_bins=4)
    tokenizer.set_expression_range(np.zeros(3), np.array([4.0, 2.0, 0.0]))
    x = torch.tensor([[0.0, 1.9, 0.0], [3.99, 0.5, 5.0], [9.0, -1.0, 1.0]])
    bins = tokenizer.bins(x)
    np.testing.assert_array_equal(bins.numpy(), [[0, 3, 0], [3, 1, 3], [3, 0, 3]])
    tokens = tokenizer(x)
    assert tokens.shape == (3, 3, 3)
    expected = tokenizer.bin_embedding.weight[bins[0, 1]] + torch.tensor([0.0, 1.0, 0.0])
    torch.testing.assert_close(tokens[0, 1], expected)
    projected = GeneTokenizer(np.ones((3, 5), dtype=np.float32), d_model=3, n_bins=4)
    assert isinstance(projected.projection, torch.nn.Linear)


def test_gene_set_tokens_are_a_masked_linear_map():
    torch.manual_seed(0)
    members = [[0, 2], [1, 2, 3], [3]]
    tokenizer = GeneSetTokenizer(members, d_model=4)
    x = torch.rand(5, 4)
    expected = torch.stack(
        [
            sum(x[:, g, None] * tokenizer.weight[k, j] for j, g in enumerate(genes))
            + tokenizer.bias[k]
            for k, genes in enumerate(members)
        ],
        dim=1,
    )
    torch.testing.assert_close(tokenizer(x), expected)


# ---------------------------------------------------------------------- data and models
@pytest.fixture(scope="module")
def adata():
    data = simulate(n_cells=400, n_genes=120, n_cell_types=4, n_batches=3, seed=1)
    return data[data.obs["condition"] == "reference"].copy()


@pytest.fixture(scope="module")
def gene_embeddings(adata):
    rng = np.random.default_rng(0)
    index = [*adata.var_names, "NOT_IN_DATA_1", "NOT_IN_DATA_2"]  # extra rows are ignored
    return pd.DataFrame(rng.normal(size=(len(index), 16)), index=index)


@pytest.fixture(scope="module")
def gene_sets(adata):
    """One set per cell type holding its markers, and four random sets of other genes."""
    marker_of = adata.var["marker_of"].astype(str)
    sets = {
        f"markers_{cell_type}": list(adata.var_names[marker_of == cell_type])
        for cell_type in sorted(set(marker_of) - {""})
    }
    others = np.asarray(adata.var_names[marker_of == ""])
    rng = np.random.default_rng(0)
    for i in range(4):
        sets[f"random_{i}"] = list(rng.choice(others, 10, replace=False))
    return sets


def _setup(adata):
    data = adata.copy()
    CELLULAR.setup_anndata(data, labels_key="cell_type", batch_key="batch")
    return data


@pytest.fixture(scope="module")
def model2(adata, gene_embeddings):
    scvi.settings.seed = 0
    model = CELLULAR(
        _setup(adata), encoder="transformer", gene_embeddings=gene_embeddings, n_bins=16, **SMALL
    )
    model.train(max_epochs=3, batch_size=64, **TRAIN)
    return model


@pytest.fixture(scope="module")
def gene_set_model(adata, gene_sets):
    scvi.settings.seed = 0
    model = CELLULAR(_setup(adata), encoder="transformer", gene_sets=gene_sets, **SMALL)
    model.train(
        max_epochs=20, batch_size=64, plan_kwargs={"lr": 5e-3, "warmup_epochs": 1}, **TRAIN
    )
    return model


def _check_rollout(table: pd.DataFrame, n_cells: int, columns: list[str]) -> None:
    assert table.shape == (n_cells, len(columns))
    assert list(table.columns) == columns
    assert (table.to_numpy() >= 0).all()
    np.testing.assert_allclose(table.sum(axis=1), 1.0, atol=1e-5)


def test_model2_trains_and_rolls_out_over_genes(model2, adata):
    assert model2.is_trained_
    assert "train_cell_type_loss" in model2.history
    tokenizer = model2.module.encoder.branches["genes"].tokenizer
    assert (tokenizer.expression_high > tokenizer.expression_low).float().mean() > 0.9
    assert model2.get_latent_representation().shape == (adata.n_obs, 8)
    table = attention_rollout(model2, indices=np.arange(40))
    _check_rollout(table, 40, list(adata.var_names))
    assert list(table.index) == list(adata.obs_names[:40])


def test_gene_set_rollout_prefers_a_types_marker_set(gene_set_model, adata, gene_sets):
    truth = adata.obs["cell_type"].astype(str).to_numpy()
    assert (gene_set_model.predict() == truth).mean() > 0.9
    table = attention_rollout(gene_set_model)
    _check_rollout(table, adata.n_obs, list(gene_sets))
    random_sets = [name for name in gene_sets if name.startswith("random_")]
    margins, specificity = [], []
    for cell_type in np.unique(truth):
        own = table[f"markers_{cell_type}"]
        margins.append(
            own[truth == cell_type].mean()
            - table.loc[truth == cell_type, random_sets].to_numpy().mean()
        )
        specificity.append(own[truth == cell_type].mean() - own[truth != cell_type].mean())
    # seeds 0-7 give mean margins 0.03-0.07 after 20 epochs (untrained: about -0.005)
    assert np.mean(margins) > 0.015, margins
    assert np.mean(specificity) > 0, specificity


@pytest.mark.parametrize("which", ["model2", "gene_set_model"])
def test_save_load_identical(which, request, adata, tmp_path):
    model = request.getfixturevalue(which)
    model.save(tmp_path / which, save_anndata=False)
    z = model.get_latent_representation()
    rolled = attention_rollout(model)
    loaded = CELLULAR.load(tmp_path / which, adata=model.adata)
    np.testing.assert_array_equal(loaded.get_latent_representation(), z)
    bare = CELLULAR.load(tmp_path / which, adata=False)
    np.testing.assert_array_equal(bare.get_latent_representation(adata), z)
    pd.testing.assert_frame_equal(attention_rollout(bare, adata), rolled)
    saved = bare.init_params_["non_kwargs"]
    if which == "model2":  # the matrix lives in the module state, not in the init params
        assert saved["gene_embeddings"] == {"saved_in_module_state": [adata.n_vars, 16]}
    else:
        assert all(isinstance(genes, list) for genes in saved["gene_sets"].values())


def test_query_mapping_keeps_the_token_encoder(gene_set_model, adata):
    query = adata[:50].copy()
    query.obs["batch"] = "new_donor"
    query.obs["cell_type"] = "Unknown"
    model = CELLULAR.load_query_data(query, gene_set_model)
    assert not any(p.requires_grad for p in model.module.parameters())
    np.testing.assert_allclose(
        model.get_latent_representation(),
        gene_set_model.get_latent_representation()[:50],
        atol=1e-5,
    )


def test_model3_has_both_token_branches(adata, gene_embeddings, gene_sets):
    model = CELLULAR(
        _setup(adata),
        encoder="transformer",
        gene_embeddings=gene_embeddings,
        gene_sets=gene_sets,
        n_bins=16,
        **SMALL,
    )
    model.train(max_epochs=1, batch_size=64, **TRAIN)
    assert model.get_latent_representation().shape == (adata.n_obs, 8)
    with pytest.raises(ValueError, match="choose one with tokens"):
        attention_rollout(model)
    _check_rollout(
        attention_rollout(model, indices=[0, 1], tokens="genes"), 2, list(adata.var_names)
    )
    _check_rollout(
        attention_rollout(model, indices=[0, 1], tokens="gene_sets"), 2, list(gene_sets)
    )


# ---------------------------------------------------------------------- inputs
def test_gene_sets_from_gmt_file(adata, tmp_path):
    genes = list(adata.var_names)
    path = tmp_path / "sets.gmt"
    path.write_text(
        f"SET_A\tdescription\t{genes[0]}\t{genes[1]}\tABSENT_GENE\n\n"
        f"SET_B\thttp://example.org\t{genes[2]}\t{genes[2]}\n"
    )
    assert read_gmt(path) == {
        "SET_A": [genes[0], genes[1], "ABSENT_GENE"],
        "SET_B": [genes[2]] * 2,
    }
    with pytest.warns(UserWarning, match="1 gene\\(s\\) of gene_sets are not in the data"):
        model = CELLULAR(_setup(adata), encoder="transformer", gene_sets=str(path), **SMALL)
    assert model.module.encoder.token_names == {"gene_sets": ["SET_A", "SET_B"]}
    assert model.init_params_["non_kwargs"]["gene_sets"] == {
        "SET_A": genes[:2],
        "SET_B": [genes[2]],
    }


def test_bad_inputs(adata, gene_embeddings, gene_sets, tmp_path):
    data = _setup(adata)
    with pytest.raises(ValueError, match="encoder='transformer' needs gene_embeddings"):
        CELLULAR(data, encoder="transformer")
    with pytest.raises(ValueError, match="inputs of encoder='transformer'"):
        CELLULAR(data, gene_sets=gene_sets)
    with pytest.raises(ValueError, match="encoder must be"):
        CELLULAR(data, encoder="attention")
    with pytest.raises(ValueError, match="no row for 7 of the 120 genes"):
        CELLULAR(data, encoder="transformer", gene_embeddings=gene_embeddings.iloc[7:])
    with pytest.raises(ValueError, match="100 rows but the data has 120 genes \\(20 missing\\)"):
        CELLULAR(data, encoder="transformer", gene_embeddings=np.zeros((100, 8)))
    with_nan = gene_embeddings.copy()
    with_nan.iloc[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        CELLULAR(data, encoder="transformer", gene_embeddings=with_nan)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CELLULAR(data, encoder="transformer", gene_sets=tmp_path / "missing.gmt")
    with pytest.raises(ValueError, match="1 gene set\\(s\\) have no gene in the data"):
        CELLULAR(data, encoder="transformer", gene_sets={"absent": ["NOT_A_GENE"]})
    with pytest.raises(ValueError, match="is a string"):
        CELLULAR(data, encoder="transformer", gene_sets={"typo": data.var_names[0]})
    with pytest.raises(ValueError, match="divisible by n_heads"):
        CELLULAR(data, encoder="transformer", gene_sets=gene_sets, d_model=10, n_heads=4)
    feedforward = CELLULAR(data, n_latent=4, n_hidden=(8,))
    with pytest.raises(ValueError, match="transformer encoder"):
        attention_rollout(feedforward)


def test_token_attentions_move_loader_tensors_to_the_modules_device(model2):
    # No GPU here: the meta device stands in for one. Loader tensors come on the CPU and
    # must be moved to the module's device, as on a GPU.
    module = copy.deepcopy(model2.module).to("meta")
    tensors = next(iter(model2._make_data_loader(model2.adata, indices=np.arange(8))))
    attentions = module.token_attentions(tensors, "genes")
    assert len(attentions) == SMALL["n_layers"]
    assert all(layer.device.type == "meta" for layer in attentions)

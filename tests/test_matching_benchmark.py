"""The matching studies (issue 15): snareseq_matching on the untrained methods, matching_scale."""

from conftest import requires_shared_data

from scvi_ext.benchmark import run_study


@requires_shared_data
def test_snareseq_matching_study_scores_the_untrained_methods_both_ways(tmp_path):
    tables = run_study(
        "snareseq_matching",
        seeds=[0],
        outdir=tmp_path,
        options={"methods": ("random", "gene_activity_pca")},
    )
    matching = tables["matching"]
    assert set(matching["method"]) == {"random", "gene_activity_pca"}
    assert set(matching["direction"]) == {"rna_to_atac", "atac_to_rna"}
    assert (matching["max_nonzeros_per_row"] <= 1000).all()
    by_method = matching[matching["assignment"] == "none"].groupby("method")
    score = by_method["competition_score"].mean()
    n_held_out = 2062  # 20% of 10,309 cells
    assert score["random"] < 2 / n_held_out < 5 / n_held_out < score["gene_activity_pca"]
    assert (tmp_path / "gene_activity_pca_similarity_seed0.png").exists()


def test_matching_scale_study_memory_and_row_sums():
    from scvi_ext.benchmark._matching import matching_scale

    table = matching_scale(0, sizes=(1500, 3000))["scale"]
    assert list(table["n_cells"]) == [1500, 3000]
    assert (table["nonzeros"] == table["n_cells"] * 1000).all()
    assert (table["competition_score"] > 1 / 1500).all()

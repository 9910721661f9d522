"""RNA-ATAC cell matching (issue 15): the snareseq_matching study and its baselines."""

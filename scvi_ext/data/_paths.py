import os
from pathlib import Path

DATA_DIR_ENV_VAR = "SCVI_EXT_DATA"
EXAMPLE_FILE = "kang_ifnb_pbmc_1975.h5ad"


def _default_data_dir() -> Path:
    """``<project root>/../shared/datasets``, the project root holding ``scvi_ext``."""
    project_root = Path(__file__).resolve().parents[2]
    return project_root.parent / "shared" / "datasets"


def get_data_dir() -> Path:
    """Folder holding the shared datasets.

    The environment variable ``SCVI_EXT_DATA`` wins when set; otherwise
    ``../shared/datasets`` next to the project root (the folder that contains the
    ``scvi_ext`` package) is used when it exists.

    Returns
    -------
    The data folder.

    Raises
    ------
    FileNotFoundError
        When ``SCVI_EXT_DATA`` points to a missing folder, or when it is unset and the
        default folder does not exist.
    """
    env_value = os.environ.get(DATA_DIR_ENV_VAR)
    if env_value:
        data_dir = Path(env_value).expanduser()
        if not data_dir.is_dir():
            raise FileNotFoundError(
                f"The environment variable {DATA_DIR_ENV_VAR} points to '{data_dir}', "
                "which is not an existing folder. Set it to the folder holding the shared "
                f"datasets (e.g. {EXAMPLE_FILE})."
            )
        return data_dir
    data_dir = _default_data_dir()
    if data_dir.is_dir():
        return data_dir
    raise FileNotFoundError(
        f"No scvi_ext data directory found (looked for {data_dir}): set the environment "
        f"variable {DATA_DIR_ENV_VAR} to the folder holding the shared datasets "
        f"(e.g. {EXAMPLE_FILE})."
    )

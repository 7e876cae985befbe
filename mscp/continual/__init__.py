"""Continual projection over safety dimensions (docs/method.md, "Continual projection").

    state      init / add / status of a state folder, each update swapped in atomically
    analytics  per-dimension sizes, overlap and where rows sit; figures and the text table
    figures    small PNG helpers (matplotlib)
"""
from mscp.continual.analytics import analytics, format_status, write_figures  # noqa: F401
from mscp.continual.state import add, init, load_state, status  # noqa: F401

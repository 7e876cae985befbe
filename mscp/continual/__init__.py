"""Continual projection over safety dimensions (docs/method.md, "Continual projection").

    state      init / add / status of a state folder, each update swapped in atomically
    record     state.json as a typed record (State): one from_json, one to_json, the schema version
    analytics  per-dimension sizes, overlap and where rows sit; figures and the text table
    figures    small PNG helpers (matplotlib)
"""
from mscp.continual.analytics import analytics, format_status, write_figures  # noqa: F401
from mscp.continual.record import State  # noqa: F401
from mscp.continual.state import add, init, load_state, status  # noqa: F401

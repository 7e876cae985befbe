"""mscp: training-free safety repair of LoRA adapters (Multi-Level Safety Continual Projection).

    from mscp import patch, fast_project, PatchConfig

`patch` runs the whole pipeline (safety layers, safety neurons, masked projection) streamed one
decoder layer at a time; `patch_many` does it for several adapters of one model; `patch_peft_model`
repairs an adapter of a live peft `PeftModel`; `fast_project` applies the projection when the row
masks are known.
"""
__version__ = "0.1.0"

__all__ = ["PatchConfig", "MSCPError", "fast_project", "patch", "patch_many", "patch_peft_model", "__version__"]


def __getattr__(name):  # lazy, so `import mscp.kernels` stays light
    if name == "PatchConfig":
        from mscp.core.config import PatchConfig
        return PatchConfig
    if name == "MSCPError":
        from mscp.errors import MSCPError
        return MSCPError
    if name == "fast_project":
        from mscp.core.project import fast_project
        return fast_project
    if name == "patch":
        from mscp.core.pipeline import patch
        return patch
    if name == "patch_many":
        from mscp.core.pipeline import patch_many
        return patch_many
    if name == "patch_peft_model":
        from mscp.core.peft_patch import patch_peft_model
        return patch_peft_model
    raise AttributeError(f"module 'mscp' has no attribute {name!r}")


def __dir__():  # the lazy names too, for dir(mscp) and IDEs
    return sorted(set(globals()) | set(__all__))

"""Without a GPU, Triton kernels run in its interpreter. The switch is read when a kernel is defined (at import of
its module), so it is set here, before any test module imports the package.

Also without a GPU: transformers' Gated DeltaNet models (the references of the Qwen3.5 / Qwen3-Next tests) run
transformers' own torch recurrence, not fla-core's Triton kernels where fla-core is installed (those would run in the
interpreter, and its chunked kernels do not run there)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import importlib.util

    if importlib.util.find_spec("fla") is not None:
        from tests.helpers import GDN_MODELING, torch_gdn_reference

        for _name in GDN_MODELING:  # those this transformers has
            if importlib.util.find_spec(f"transformers.models.{_name}") is not None:
                importlib.import_module(f"transformers.models.{_name}.modeling_{_name}")
        _GDN_REFERENCE = torch_gdn_reference()  # kept: a collected context manager would restore on exit
        _GDN_REFERENCE.__enter__()  # for the whole session

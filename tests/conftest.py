import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

from kvshrink.testing import FAMILIES, tiny_model  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny():
    """tiny(family, **kw) -> cached random-weight model (do not mutate it)."""
    cache = {}

    def get(family="llama", **kw):
        key = (family, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = tiny_model(family, **kw)
        return cache[key]

    return get


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param

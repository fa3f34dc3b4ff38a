"""How the stand-in servers are started."""

from __future__ import annotations

import inspect
from pathlib import Path

from dspy_anyscale import _constants as C
from dspy_anyscale.servers import llama_cpp_python, llama_server


def test_the_stand_ins_infer_on_one_thread_unless_told():
    # Two llama.cpp threads on two busy cores crawl (measured 48x slower beside one busy process): see
    # _constants.STAND_IN_THREADS.
    assert C.STAND_IN_THREADS == 1
    for module in (llama_server, llama_cpp_python):
        assert inspect.signature(module.start).parameters["threads"].default == C.STAND_IN_THREADS
    served = llama_server._server_command(Path("llama-server"), Path("m.gguf"), 8080, "a", 2048, 3)
    assert served[served.index("-t") + 1] == "3"
    python = llama_cpp_python._server_command(Path("python"), Path("m.gguf"), 8080, "a", 2048, 3)
    assert python[python.index("--n_threads") + 1] == python[python.index("--n_threads_batch") + 1] == "3"

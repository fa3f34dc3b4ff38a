"""The parts of :class:`dspy_anyscale.Router`, one job each; ``router.py`` is the DSPy ``BaseLM`` surface.

* :mod:`.calling`: one call's plan (the members it may try, in order), each try's context, the fallback loop;
* :mod:`.streaming`: direct streams, which move on only before their first chunk;
* :mod:`.health`: each member's circuit breaker and load figures (``MemberHealth``);
* :mod:`.policy`: which errors move a call on to the next member, and what each means for health;
* :mod:`.strategies`: the order in which one call tries the members (pure);
* :mod:`.members`: naming and checking members, their ``Anyscale`` leaves and context windows;
* :mod:`.limits`: the Router's own limits over all members;
* :mod:`.accounting`: the Router's history and usage (which member answered);
* :mod:`.saving`: ``dump_state`` / ``load_state``;
* :mod:`.config` and :mod:`.building`: a Portkey-style config, parsed (pure), then built;
* :mod:`.options`: the checks of the Router's own options;
* :mod:`.adapter`: DSPy's adapter-call marker, passed on to the member;
* :mod:`.probes`: the optional thread that asks cooling members ``GET /models``;
* :mod:`.shape`: what these parts read of the Router (none of them imports ``router.py``).
"""

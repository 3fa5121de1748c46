"""Helpers shared by the test suites, imported as `support.<module>` (pytest puts tests/ on the path).

- `live_server`: a real `woolly serve` subprocess on a free loopback port, and the configs the suites use.
- `metrics`: a live server's /metrics gauges, idle waits, one streamed generation, RssAnon.
- `errors`: the shape every error response has.
- `websocket`: one `/ws` connection as JSON events.
- `engine`: the engine tests' shared shapes and an event runner.
- `rel_shapes`, `leak_recorder`: the reliability server's shapes and its recorder of error bodies.
"""

"""The one test harness: every test and bench that starts a real thing takes it from here.

Tests import from `tests.support.*`, never from a conftest.py or another test module.

| module         | what it gives                                                                |
|----------------|------------------------------------------------------------------------------|
| processes      | `free_port`, `wait_for_port`, `wait_http_ready`, `stop_process`, plain `Broker` |
| waiting        | `wait_for(what, check, timeout)`: the one poller (`WaitTimeout` on failure)  |
| broker         | `secured_broker`: mosquitto with device logins and ACLs, owned by the test   |
| hub            | `HubProcess`: `autodl-hub init` + `serve` on free ports; `call`, `publish`   |
| agent          | `AgentProcess` with the one fast-timings preset `FAST`; `enroll`, `infer`    |
| fleet          | `Fleet`: broker → versions → hub → N agents → converge → tear down (logs on failure) |
| traffic        | `Traffic`: OIP v2 requests to agents from a background thread                |
| models         | the test models: linear ONNX of a seed, `slow_linear_onnx`, signed releases  |
| mqtt           | `Probe` (a recording MQTT v5 client), `Watcher` (what agents report)         |
| hub_app        | the hub app in-process behind a TestClient (`Hub`, `make_hub`, `build_version`) |
| rollout_hub    | `RolloutHub`: the app with enrolled devices for rollout logic tests          |
| sim_device     | `SimDevice`: a device simulated on a real broker                             |
| hubstub        | `HubStub`: the hub's HTTP API stand-in for agent tests                       |
| stall_proxy    | `StallProxy`: an HTTP proxy that holds a transfer midway                     |
| dashboard      | versions with gate figures and a device speaking MQTT, for the UI tests      |
| faults         | the fault tests' version table                                               |
| digits         | the digits CNN and its build request (needs torch)                           |
| wire_examples  | one valid example of every wire message                                      |
| postgres       | a fresh PostgreSQL schema                                                    |
| paths          | where the repository's files are                                             |
"""

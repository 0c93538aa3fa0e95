"""The hub's REST API: one router per resource, wired together by `hub.main.create_app`."""

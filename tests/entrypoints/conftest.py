"""Fixtures the HTTP tests share: one server of the built-in model on the CPU, started once for every test module
that needs no flags of its own (modules that test flags start their own server)."""

import pytest

from tests.helpers import start_server

BUILTIN_SERVER_ARGS = ["--device", "cpu", "--cpu-cache-gb", "0.25"]


@pytest.fixture(scope="session")
def builtin_server(tmp_path_factory):
    srv = start_server(BUILTIN_SERVER_ARGS, tmp_path_factory.mktemp("builtin-server") / "log")
    yield srv
    assert srv.stop() == 0, srv.log()

"""dpo_dist.distributed.gloo_interface: multi-node gloo where a node's name resolves to loopback."""

from __future__ import annotations

import socket

import pytest

from dpo_dist.distributed import _interface_address, gloo_interface


def routable_interface() -> tuple[str, str]:
    """(name, IPv4 address) of an interface of this machine off loopback."""
    for _, name in socket.if_nameindex():
        address = _interface_address(name)
        if address is not None and not address.startswith("127."):
            return name, address
    pytest.skip("no IPv4 interface besides loopback here")


def test_a_name_resolving_to_loopback_gets_the_interface_that_reaches_the_master(monkeypatch):
    name, address = routable_interface()
    monkeypatch.setattr(socket, "gethostbyname", lambda host: "127.0.1.1")  # Debian's /etc/hosts line
    # The master is another node; the route to it (here: to this interface's own address) goes out by `name`.
    assert gloo_interface(address) == name
    assert gloo_interface("127.0.0.1") is None  # a master on this host: loopback is right


def test_gloo_keeps_its_own_choice_where_it_works(monkeypatch):
    _, address = routable_interface()
    monkeypatch.setattr(socket, "gethostbyname", lambda host: address)
    assert gloo_interface(address) is None


def test_loopback_has_an_address_and_unknown_interfaces_none():
    assert _interface_address("lo") == "127.0.0.1"
    assert _interface_address("no-such-if0") is None

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


# ----------------------------------------------------------------------------- GPU per rank


def test_a_rank_beyond_the_visible_gpus_is_an_error_not_a_shared_gpu(monkeypatch):
    """gpu_index wrapped around (local_rank % device_count): rank 2 of 2 GPUs silently took GPU 0."""
    import torch

    from dpo_dist.config import ConfigError
    from dpo_dist.distributed import DistEnv, device_for, gpu_index

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert [gpu_index(0), gpu_index(1)] == [0, 1]
    assert device_for(DistEnv(1, 1, 2, "127.0.0.1", 1, None)) == torch.device("cuda", 1) and chosen == [1]
    message = "LOCAL_RANK=2 but only 2 CUDA device(s) are visible: ranks would share GPUs; start at most one rank per GPU on a node"
    with pytest.raises(ConfigError) as error:
        gpu_index(2)
    assert str(error.value) == message
    with pytest.raises(ConfigError):
        device_for(DistEnv(2, 2, 3, "127.0.0.1", 1, None))
    assert chosen == [1]  # no set_device for the refused rank


def test_without_cuda_the_local_rank_only_names_the_rank(monkeypatch):
    import torch

    from dpo_dist.distributed import DistEnv, device_for, gpu_index

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert gpu_index(5) == 5
    assert device_for(DistEnv(5, 5, 8, "127.0.0.1", 1, None)) == torch.device("cpu")

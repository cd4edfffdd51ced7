"""The etcd the cluster tests run against (xknock_dev/etcd.py): three real
members on loopback, an outage by SIGKILL and a return with the data kept."""

from xknock_dev.etcd import EtcdCluster


def test_three_members_on_loopback_survive_a_sigkill_of_all(tmp_path):
    with EtcdCluster.loopback(tmp_path) as etcd:
        assert len(etcd.endpoints) == 3 and etcd.healthy()
        assert etcd.ctl("put", "/t/k", "v").returncode == 0
        etcd.sigkill()
        assert not etcd.healthy()
        etcd.start()
        assert etcd.get_prefix("/t/") == {"/t/k": "v"}
    assert all(member.process.poll() is not None for member in etcd.members)

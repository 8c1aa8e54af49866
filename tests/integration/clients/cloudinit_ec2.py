"""Drive cloud-init's own EC2 datasource (Debian's cloudinit package) once; print JSON.

Run with the system Python that has cloud-init (/usr/bin/python3), never the
project's venv, and only inside the test harness's namespaces::

    cloudinit_ec2.py PLATFORM MAX_WAIT TIMEOUT

PLATFORM ``aws`` declares the platform that cloud-init's DMI probe would find
on EC2 (this machine has no DMI or /sys/hypervisor to find it in): the
datasource then fetches an IMDSv2 token first. ``unknown`` leaves the probe's
own answer, with which cloud-init 22.4 speaks IMDSv1 only. Nothing else is
changed: API versions, crawl, retries and token handling are cloud-init's.
"""

import json
import sys
import tempfile
import time

from cloudinit import helpers, version
from cloudinit.sources import DataSourceEc2 as ec2_ds


def main() -> int:
    platform, max_wait, timeout = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    tmp = tempfile.mkdtemp(prefix="cloudinit-")
    paths = helpers.Paths({"cloud_dir": tmp, "run_dir": tmp})
    ds_cfg = {"metadata_urls": ["http://169.254.169.254"], "max_wait": max_wait, "timeout": timeout}
    ds = ec2_ds.DataSourceEc2({"datasource": {"Ec2": ds_cfg}}, None, paths)
    if platform == "aws":
        ds._cloud_name = ec2_ds.CloudNames.AWS
    start = time.monotonic()
    found = ds.get_data()
    elapsed = time.monotonic() - start
    out = {
        "cloud_init": version.version_string(),
        "found": bool(found),
        "elapsed": elapsed,
        "cloud_name": ds.cloud_name,
        "imdsv2": ds._api_token is not None,
    }
    if found:
        md = ds.metadata
        mac = md["mac"]
        out.update(
            api_version=ds._crawled_metadata["_metadata_api_version"],
            instance_id=ds.get_instance_id(),
            region=ds.region,
            availability_zone=ds.availability_zone,
            local_hostname=ds.get_hostname().hostname,
            public_keys=ds.get_public_ssh_keys(),
            meta_data_keys=sorted(md),
            identity=ds.identity,
            network=ec2_ds.convert_ec2_metadata_network_config(
                md["network"], macs_to_nics={mac: "eth0"}
            ),
        )
    print(json.dumps(out))
    return 0 if found else 1


if __name__ == "__main__":
    sys.exit(main())

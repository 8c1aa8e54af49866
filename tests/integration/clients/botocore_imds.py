"""botocore's own IMDS consumers, as an SDK user gets them; prints one JSON object.

The credential provider (InstanceMetadataProvider with botocore's
InstanceMetadataFetcher), the region provider (IMDSRegionProvider, whose
InstanceMetadataRegionFetcher asks ``placement/availability-zone/`` with the
trailing slash) and the session's whole credential chain (which, with an AWS
config naming ``credential_process``, runs that instead). Timeouts and
attempts are botocore's defaults (``metadata_service_timeout`` 1 s,
``metadata_service_num_attempts`` 1). No secret is printed.
"""

import json
import sys
import time

import botocore
import botocore.session
from botocore.credentials import InstanceMetadataProvider
from botocore.utils import IMDSRegionProvider, InstanceMetadataFetcher


def main() -> int:
    session = botocore.session.get_session()
    out: dict = {"botocore": botocore.__version__}
    start = time.monotonic()
    fetcher = InstanceMetadataFetcher(
        timeout=session.get_config_variable("metadata_service_timeout"),
        num_attempts=session.get_config_variable("metadata_service_num_attempts"),
        user_agent=session.user_agent(),
    )
    creds = InstanceMetadataProvider(iam_role_fetcher=fetcher).load()
    out["imds_seconds"] = time.monotonic() - start
    out["imds_access_key"] = None if creds is None else creds.access_key
    out["imds_has_token"] = creds is not None and bool(creds.token)
    start = time.monotonic()
    out["region"] = IMDSRegionProvider(session).provide()
    out["region_seconds"] = time.monotonic() - start
    start = time.monotonic()
    chain = session.get_credentials()
    out["chain_seconds"] = time.monotonic() - start
    out["chain_method"] = None if chain is None else chain.method
    out["chain_access_key"] = None if chain is None else chain.get_frozen_credentials().access_key
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

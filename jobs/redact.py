"""Keeps credentials out of logs, outputs and summaries."""

from __future__ import annotations

import os
import re

from kiln.pipelines.s3 import AWS_SECRETS

SECRET_VARS = (*AWS_SECRETS, "RAY_AUTH_TOKEN")
_URL_CREDS = re.compile(r"(?<=://)[^/@\s:]+:[^/@\s]+@")


def redact(text: str) -> str:
    for var in SECRET_VARS:
        value = os.environ.get(var)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return _URL_CREDS.sub("***@", text)

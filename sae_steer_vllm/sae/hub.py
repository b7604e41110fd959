"""``hf:owner/repo[/subfolder][@revision]``: an SAE on the Hugging Face Hub, as a local folder.

Users write ``vllm serve deepseek-ai/DeepSeek-R1-Distill-Llama-8B`` and expect the same
for SAEs, e.g. ``--sae r1=hf:andreuka18/deepseek-r1-distill-llama-8b-lmsys-openthoughts/
blocks.19.hook_resid_post``. Every entry point that takes an SAE location (``sae-steer
serve --sae``, the plugin's ``additional_config``, ``POST /v1/saes``) passes it through
:func:`resolve_sae_location`, so they all accept the same addresses and everything after
them sees a plain local folder.

Resolution goes through ``huggingface_hub`` (a dependency of ``transformers``, so already
installed; it owns the cache layout, revisions, locking and ``HF_HUB_OFFLINE``): only the
files an SAE folder can hold are fetched (each layout's config and weights in
:data:`~sae_steer_vllm.sae.loaders.LAYOUTS`, plus the statistics file), never the rest of
the repository, and with ``HF_HUB_OFFLINE=1`` they come from the local cache alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..constants import STATS_FILE
from ..errors import SaeSteerError, UsageError
from .loaders import LAYOUTS

HF_PREFIX = "hf:"
_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
_REVISION = re.compile(r"^[A-Za-z0-9._/-]+$")


class HubAddressError(UsageError):
    """An ``hf:`` address that is not ``hf:owner/repo[/subfolder][@revision]``."""


class HubFetchError(SaeSteerError, RuntimeError):
    """The address is well formed but its files cannot be had (offline and not cached, no
    such repository, revision or subfolder)."""


@dataclass(frozen=True)
class HubAddress:
    repo_id: str
    subfolder: str = ""
    revision: str | None = None

    def __str__(self) -> str:
        sub = f"/{self.subfolder}" if self.subfolder else ""
        rev = f"@{self.revision}" if self.revision else ""
        return f"{HF_PREFIX}{self.repo_id}{sub}{rev}"

    def patterns(self) -> list[str]:
        """The files to fetch: exactly the names an SAE folder can hold, in the subfolder."""
        names = {lo.weights_file for lo in LAYOUTS.values()}
        names |= {lo.config_file for lo in LAYOUTS.values()}
        names.add(STATS_FILE)
        prefix = f"{self.subfolder}/" if self.subfolder else ""
        return sorted(prefix + n for n in names)


def is_hub_address(text: str) -> bool:
    return text.startswith(HF_PREFIX)


def parse_hub_address(text: str) -> HubAddress:
    """``hf:owner/repo[/sub/folder][@revision]`` -> :class:`HubAddress` (else a usage error)."""
    usage = "expected hf:owner/repo[/subfolder][@revision]"
    if not is_hub_address(text):
        raise HubAddressError(f"{text!r}: {usage}")
    body, at, revision = text[len(HF_PREFIX) :].partition("@")
    if at and not (revision and _REVISION.match(revision) and ".." not in revision.split("/")):
        raise HubAddressError(f"{text!r}: bad revision {revision!r}; {usage}")
    parts = body.split("/")
    if len(parts) < 2 or not all(_PART.match(p) and p not in (".", "..") for p in parts):
        raise HubAddressError(f"{text!r}: {usage}")
    return HubAddress("/".join(parts[:2]), "/".join(parts[2:]), revision if at else None)


def hub_folder(address: HubAddress) -> Path:
    """The local folder of ``address`` in huggingface_hub's cache, fetching what is missing
    (only :meth:`HubAddress.patterns`) unless ``HF_HUB_OFFLINE`` is set."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        local = snapshot_download(
            address.repo_id, revision=address.revision, allow_patterns=address.patterns()
        )
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        raise HubFetchError(
            f"{address}: not in the local Hugging Face cache and the Hub cannot be reached "
            f"(HF_HUB_OFFLINE set, or no network): {_first_line(e)}. Download it once where "
            "the Hub is reachable (the same address, or `hf download`), or pass a local folder"
        ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise HubFetchError(f"{address}: {_first_line(e)}") from None
    except OSError as e:  # network errors, a read-only cache
        raise HubFetchError(f"{address}: {type(e).__name__}: {_first_line(e)}") from None
    folder = Path(local) / address.subfolder if address.subfolder else Path(local)
    if not folder.is_dir() or not any(folder.iterdir()):
        raise HubFetchError(
            f"{address}: the repository has no SAE files in "
            f"{address.subfolder or 'its top folder'!r} (looked for {', '.join(address.patterns())})"
        )
    return folder


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def resolve_sae_location(text: str) -> Path:
    """A local folder for what a user wrote: an ``hf:`` address, or a path (made absolute)."""
    if is_hub_address(text):
        return hub_folder(parse_hub_address(text))
    return Path(text).expanduser().resolve()

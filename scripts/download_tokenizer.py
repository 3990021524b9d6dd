"""Download a model's tokenizer files from the Hugging Face Hub.

    python scripts/download_tokenizer.py --repo_id meta-llama/Llama-3.1-8B --hf_token hf_...

Llama 3 repos are gated: accept the license on the model's Hub page first, then pass a token
(or set HF_TOKEN). Files land under --local_dir with the Hub's layout, e.g.
``assets/tokenizer/original/tokenizer.model`` (tiktoken) and ``assets/tokenizer/tokenizer.json``;
point ``model.tokenizer_path`` at either, or at the folder (tokenizer.json is then preferred).
"""

from __future__ import annotations

import argparse
import os
import sys

# (file, required): the tiktoken model is what torchtitan's Llama 3 configs use.
FILES = [
    ("original/tokenizer.model", True),
    ("tokenizer.json", False),
    ("tokenizer_config.json", False),
]


def _hub_errors():
    try:  # huggingface_hub >= 0.24
        from huggingface_hub import errors
    except ImportError:  # older releases keep them in utils
        from huggingface_hub import utils as errors
    return errors


def download(repo_id: str, local_dir: str, token: str | None) -> list[str]:
    from huggingface_hub import hf_hub_download

    errors = _hub_errors()
    got = []
    for filename, required in FILES:
        try:
            got.append(hf_hub_download(repo_id, filename, local_dir=local_dir, token=token))
        except errors.GatedRepoError:
            sys.exit(
                f"error: {repo_id} is gated (401/403): accept its license on the Hub and pass a token with "
                "access (--hf_token or HF_TOKEN)"
            )
        except errors.RepositoryNotFoundError:
            sys.exit(f"error: repository {repo_id} not found (404), or it is private and the token (401) has no access")
        except errors.LocalEntryNotFoundError as e:
            sys.exit(f"error: cannot reach the Hugging Face Hub to fetch {repo_id}/{filename}: {e}")
        except errors.EntryNotFoundError:
            if required:
                sys.exit(f"error: {repo_id} has no {filename} (404); is it a Llama 3 repository?")
            print(f"note: {repo_id} has no {filename}; skipped")
        except errors.HfHubHTTPError as e:
            status = getattr(getattr(e, "response", None), "status_code", "?")
            sys.exit(f"error: fetching {repo_id}/{filename} failed with HTTP {status}: {str(e).splitlines()[0]}")
    return got


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo_id", default="meta-llama/Llama-3.1-8B", help="Hub model repository")
    parser.add_argument("--hf_token", default=os.environ.get("HF_TOKEN"), help="Hub access token (default: $HF_TOKEN)")
    parser.add_argument("--local_dir", default="assets/tokenizer/", help="where to put the files")
    args = parser.parse_args()
    for path in download(args.repo_id, args.local_dir, args.hf_token):
        print(f"saved {path}")


if __name__ == "__main__":
    main()

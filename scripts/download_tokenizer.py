"""Download a model's tokenizer folder from the Hugging Face Hub.

    python scripts/download_tokenizer.py --repo_id meta-llama/Llama-3.1-8B --hf_token hf_...

Llama 3 repos are gated: accept the license on the model's Hub page first, then pass a token
(or set HF_TOKEN). The files land in --local_dir (default ``assets/hf/<model name>``, e.g.
``assets/hf/Llama-3.1-8B``, where TorchTitan's files point ``model.hf_assets_path``) with the
Hub's layout: ``tokenizer.json``, ``tokenizer_config.json``, and for Llama
``original/tokenizer.model`` (tiktoken). Point ``model.hf_assets_path`` (or
``model.tokenizer_path``) at the folder; tokenizer.json is then preferred.
"""

from __future__ import annotations

import argparse
import os
import sys

# The tokenizer files of a Hugging Face assets folder; a repository must have at least one
# of TOKENIZER_FILES (Llama has both, Qwen only tokenizer.json).
TOKENIZER_FILES = ("tokenizer.json", "original/tokenizer.model")
FILES = [*TOKENIZER_FILES, "tokenizer_config.json", "special_tokens_map.json", "config.json", "generation_config.json"]


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
    for filename in FILES:
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
            print(f"note: {repo_id} has no {filename}; skipped")
        except errors.HfHubHTTPError as e:
            status = getattr(getattr(e, "response", None), "status_code", "?")
            sys.exit(f"error: fetching {repo_id}/{filename} failed with HTTP {status}: {str(e).splitlines()[0]}")
    if not any(path.endswith(name) for path in got for name in TOKENIZER_FILES):
        sys.exit(f"error: {repo_id} has neither {' nor '.join(TOKENIZER_FILES)} (404); is it a language model?")
    return got


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo_id", default="meta-llama/Llama-3.1-8B", help="Hub model repository")
    parser.add_argument("--hf_token", default=os.environ.get("HF_TOKEN"), help="Hub access token (default: $HF_TOKEN)")
    parser.add_argument(
        "--local_dir", default="", help="where to put the files (default: assets/hf/<model name>)"
    )
    args = parser.parse_args()
    local_dir = args.local_dir or os.path.join("assets", "hf", args.repo_id.rstrip("/").split("/")[-1])
    for path in download(args.repo_id, local_dir, args.hf_token):
        print(f"saved {path}")
    print(f'set model.hf_assets_path = "{local_dir}"')


if __name__ == "__main__":
    main()

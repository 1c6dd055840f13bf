"""Checksums that are checked: the manifest.json split_model.py writes beside its shards is read back.

- loading any checkpoint compares every weight file's size with the manifest (a stat: free), so a
  truncated or overwritten shard is named before torch tries to read it;
- `--verify` on the inference and training CLIs also compares every weight file's sha256 (a full
  read) and refuses a file whose bytes changed, even when its size did not (64 flipped bytes in the
  middle of a shard, which torch.load happily maps);
- `split_model.py --verify` re-hashes its *input* against the input's manifest first, so it never
  writes `"verified": true` over a corrupt source.
Each refusal is one `error:` line naming the file, exit code 2, nothing written.
"""

import pytest
from dist_utils import REPO, python

STORIES = REPO / "ckpts" / "stories260K"


@pytest.fixture
def split(tmp_path):
    out = tmp_path / "mp2"
    result = python("split_model.py", "--ckpt_dir", STORIES, "--num_shards", "2", "--out_dir", out)
    assert result.returncode == 0, result.stderr
    return out


def flip_middle(path, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + n] = bytes(b ^ 0xFF for b in data[middle : middle + n])
    path.write_bytes(bytes(data))


def one_error(result, *needles: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    assert all(n in lines[0] for n in needles), lines[0]


@pytest.mark.slow
def test_flipped_bytes_are_found_by_verify_and_by_split_verify(split, tmp_path):
    flip_middle(split / "consolidated.01.pth")
    one_error(python("example.py", "--ckpt_dir", split, "--max_tokens", "4", "--verify"), "consolidated.01.pth", "sha256", "corrupt")
    one_error(python("split_model.py", "--ckpt_dir", split, "--num_shards", "1", "--verify", "--out_dir", tmp_path / "merged"),
              "consolidated.01.pth", "sha256")
    assert not (tmp_path / "merged").exists(), "nothing is written from a corrupt input"


@pytest.mark.slow
def test_truncated_shard_is_named_by_its_size_on_every_load(split):
    shard = split / "consolidated.00.pth"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: size // 3])
    one_error(python("example.py", "--ckpt_dir", split, "--max_tokens", "4"), "consolidated.00.pth", f"says {size}", "truncated")


@pytest.mark.slow
def test_a_folder_without_manifest_or_with_an_edited_config_still_loads(split, tmp_path):
    """Meta's and the Hub's folders have no manifest; a user may edit params.json (not a weight file)."""
    from llama.files import MANIFEST, check_files

    params = split / "params.json"
    params.write_text(params.read_text().replace("}", ' }'))
    check_files(split, hashes=True)
    (split / MANIFEST).unlink()
    check_files(split, hashes=True)

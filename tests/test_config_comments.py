"""Config files hold settings and one-line meanings; measurements live in
docs/results.md. No comment under configs/ cites a commit, a seed range or
a measured FD/recall or a range of results."""
import glob
import io
import os
import re
import tokenize

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "configs")
RESULT = re.compile(r"\bcommit [0-9a-f]{7}|\bseeds? \d+\s*-\s*\d+|\b(FD|KID|recall|precision|"
                    r"PSNR|SSIM|HU W1) \d|(?<![x\d.])\d\.\d+ ?- ?\d\.\d+")


def comments(path):
  with open(path) as f:
    tokens = tokenize.generate_tokens(io.StringIO(f.read()).readline)
    return [(t.start[0], t.string) for t in tokens if t.type == tokenize.COMMENT]


def test_the_pattern_catches_result_comments():
  for text in ("# FD 17.0 over seeds 0-2", "# (commit e482c20)", "# large lesion 0.86-0.94"):
    assert RESULT.search(text), text
  assert not RESULT.search("# half-life ~140 steps; 1 = plain sampling")


def test_no_config_comment_cites_a_result():
  found = [f"{os.path.basename(p)}:{line}: {text}"
           for p in sorted(glob.glob(os.path.join(CONFIGS, "*.py")))
           for line, text in comments(p) if RESULT.search(text)]
  assert found == []

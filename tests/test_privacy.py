"""No DICOM identifier reaches anything a build writes or logs."""
import os
import subprocess
import sys

from conftest import IDENTIFIERS, ct_volume, write_dicom_series

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_identifiers_never_written_or_logged(tmp_path):
  src = tmp_path / "src"
  patients = []
  for i in range(4):
    tags = {k: f"{v}{i}" for k, v in IDENTIFIERS.items()}
    patients.append(tags)
    # The subject folder is the PatientID and file names carry the accession
    # number, as exported by many PACS.
    folder = src / tags["PatientID"]
    write_dicom_series(folder, ct_volume(i), tags=tags)
    for j, name in enumerate(sorted(os.listdir(folder))):
      os.rename(folder / name, folder / f"{tags['AccessionNumber']}_{j}.dcm")
  # A corrupt subject exercises the skip path (warning + summary).
  bad = src / "MRN_BROKEN_55"
  write_dicom_series(bad, ct_volume(9), tags={"PatientID": "MRN_BROKEN_55"})
  victim = sorted(bad.iterdir())[0]
  victim.write_bytes(victim.read_bytes()[:300])
  with open(tmp_path / "labels.csv", "w") as f:
    f.write("subject,smoker\n")
    for i, tags in enumerate(patients):
      f.write(f"{tags['PatientID']},{['yes', 'no'][i % 2]}\n")
  out = tmp_path / "out"
  r = subprocess.run(
      [sys.executable, "-m", "experiments.build_dataset", "--config",
       "configs/data_folder.py:quick", f"--config.source_dir={src}",
       f"--config.data_dir={out}", f"--config.labels_csv={tmp_path / 'labels.csv'}",
       "--config.split_fractions=(0.5,0.25,0.25)", "--alsologtostderr"],
      cwd=ROOT, capture_output=True, timeout=300)
  assert r.returncode == 0, r.stderr.decode()[-3000:]
  logs = r.stdout + r.stderr
  assert b"skipping subject" in logs  # the corrupt one, by opaque id only.
  secrets = [v for tags in patients for v in tags.values()] + ["MRN_BROKEN_55"]
  secrets += [s.split("^")[0] for s in secrets if "^" in s]  # surname alone.
  written = []
  for dirpath, _, filenames in os.walk(out):
    for name in filenames:
      path = os.path.join(dirpath, name)
      written.append((path, open(path, "rb").read()))
  assert any(p.endswith("summary.json") for p, _ in written)
  assert any(".array_record" in p for p, _ in written)
  for secret in secrets:
    needle = secret.encode()
    assert needle not in logs, f"{secret!r} leaked into the logs"
    for path, content in written:
      assert needle not in content, f"{secret!r} leaked into {path}"
      assert secret not in path, f"{secret!r} leaked into a file name"
  # The dataset is still useful: labels and pixels made it in.
  summary = (out / "summary.json").read_text()
  assert '"smoker"' in summary and '"skipped_counts"' in summary

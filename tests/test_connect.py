"""The Ray connection's console: Ray's own output goes to a log file, kiln's to the terminal,
and the warnings among Ray's are counted where the user sees them."""

import os

from kiln.cluster import connect


def test_ray_output_goes_to_the_log_and_its_warnings_are_counted(tmp_path, capfd):
    log = tmp_path / "console.log"
    with connect.native_stderr_to(str(log)):
        os.write(2, b"[2026-12-01 17:09:26,180 E 27519 27519] core_worker.cc:2465: Actor with "
                    b"class name: 'X' has constructor arguments in the object store\n")
        os.write(2, b"2026-12-01 WARNING worker.py:1 -- the object store is full, spilling\n")
        connect.console().print("kiln: 3 rows labeled")
    shown = capfd.readouterr().err
    assert "kiln: 3 rows labeled" in shown  # kiln's own line on the terminal
    assert "object store" not in shown and "core_worker" not in shown  # Ray's in the file
    assert f"note: Ray wrote 1 warning(s) or error(s) to {log}" in shown  # the routine one not
    written = log.read_text()
    assert "core_worker.cc" in written and "spilling" in written
    os.write(2, b"after\n")  # fd 2 is the terminal again
    assert "after" in capfd.readouterr().err and "after" not in log.read_text()

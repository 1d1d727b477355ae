"""What the tests share, imported as ``from helpers.<module> import ...`` (tests/ is on the path of a test run).

pause.py and donor_weights.py are Lightning callbacks for the tests' subprocesses, which get this folder on
their PYTHONPATH (helpers.processes.run_script) and import them as ``pause`` and ``donor_weights``.
Fixtures are in tests/conftest.py.
"""

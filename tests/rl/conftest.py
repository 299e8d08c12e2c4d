def pytest_configure(config):
    config.addinivalue_line("markers", "ray: starts Ray (the one integration test of haet rl)")

"""The core: events, state, the Trainer loop, Method base, Budget, RunRecord."""

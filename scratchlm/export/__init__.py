"""Writers of trained models in other ecosystems' formats."""

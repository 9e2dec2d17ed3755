"""Grove's runtime core: what every stage uses (store, cache keys, settings, models, engines).

It imports no stage (tasks/) and no flow (flows/).
"""

"""Jobs: what the commands do (train, evaluate, predict, report, export, check, info, ablate,
sweep, demo), one module each, over the fitted `Tagger` and the library below it. The faces
(cli, serve) call these and nothing deeper; `mmtag.api` gathers them in one import. (Nothing is
re-exported here: a function named like its module would hide the module.)"""

"""What the site wing and the server wing share.

- :mod:`.settings`: the run config, converted and checked once (:class:`Settings`);
- :mod:`.protocol`: every record, config and metric key of the messages;
- :mod:`.models`: the MONAI network factory (both sides build the same network);
- :mod:`.amp_norm`: HarmoFL's amplitude normalisation, a layer of that network;
- :mod:`.tasks`: losses and metrics of segmentation and classification;
- :mod:`.private_params`: which parameters never leave a site;
- :mod:`.device`: where tensors go.

Importing this package imports none of them (each wing imports what it needs).
"""

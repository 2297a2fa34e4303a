"""The diffusion side: a LightningDiT velocity model over the latent grid (`aligntok.diffusion.dit`)
and the linear flow-matching path, loss and ODE samplers (`aligntok.diffusion.flow`).

Nothing is imported here eagerly; import the submodule you need.
"""

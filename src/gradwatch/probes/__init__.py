"""Probes measure one thing each and hold no opinion about it.

Every probe returns 0-d device tensors (never Python numbers) so that nothing waits
for the device while training runs; the watcher stacks them and reads them at flush.
"""

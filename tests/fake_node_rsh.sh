#!/bin/sh
# A launcher agent ("rsh") for tests: runs the launcher's remote command on a *fake node*,
# this same machine in a new UTS namespace whose hostname is the node's name. MPI libraries
# tell nodes apart by hostname, so ranks on different fake nodes reach each other's windows
# through the network module (MPICH: ucx; Open MPI: btl tcp + osc rdma), ranks on one fake
# node through shared memory. Used as mpirun's ssh/rsh agent:
#   MPICH:    mpirun -launcher ssh -launcher-exec tests/fake_node_rsh.sh -hosts a:3,b:3 ...
#   Open MPI: mpirun --mca plm_rsh_agent tests/fake_node_rsh.sh --host a:3,b:3 ...
# Needs unshare(1) and either root or unprivileged user namespaces.
while [ "${1#-}" != "$1" ]; do shift; done     # rsh options such as -x
host=$1
shift
if unshare --uts true 2>/dev/null; then
    exec unshare --uts /bin/sh -c "hostname $host && $*"
fi
exec unshare --user --map-root-user --uts /bin/sh -c "hostname $host && $*"

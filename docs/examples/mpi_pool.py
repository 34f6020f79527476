"""The seed's Pool session inside one MPI job: mpirun -n 4 python docs/examples/mpi_pool.py

Rank 0 runs the Center, ranks 2 and 3 are workers, rank 1 runs the rest of
this script; when it ends, every rank stops and mpirun exits with its status.
"""
from zdist import Pool
from zdist.deploy.mpi import initialize

cluster = initialize()  # ranks 0, 2, 3 serve here and exit when rank 1 is done

with Pool(cluster) as pool:
    A = pool.map(lambda x: x**2, range(10))
    B = pool.map(lambda x: -x, A)  # runs where A is: no data moves
    total = pool.apply(sum, [B])
    print("workers:", len(pool.available_cores))
    print("total:", total.get())
    print("A:", pool.gather(A))

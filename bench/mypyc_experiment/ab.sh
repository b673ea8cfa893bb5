#!/bin/bash
# usage: ab.sh TAG ROUNDS ONLY
cd /work/wt-mypyc
TAG=$1; N=${2:-2}; ONLY=${3:-rpc}
SO=$(ls hwbkptd/*.so proto/hwbkpt_proto/*.so | grep -v _fastpath)
mkdir -p /tmp/mypyc-work/so-$TAG
for i in $(seq 1 $N); do
  for kind in compiled pure; do
    if [ $kind = pure ]; then for f in $SO; do mv $f /tmp/mypyc-work/so-$TAG/$(echo $f | tr / _); done; fi
    echo "$kind $i $(uptime)" >> /tmp/mypyc-work/ab-$TAG.log
    .venv/bin/python -m bench --only $ONLY --runs 3 --json /tmp/mypyc-work/ab-$TAG-$kind-$i.json > /tmp/mypyc-work/ab-$TAG-$kind-$i.txt 2>&1
    if [ $kind = pure ]; then for f in $SO; do mv /tmp/mypyc-work/so-$TAG/$(echo $f | tr / _) $f; done; fi
    grep "daemon CPU\|p50\|/s \|CPU/stop" /tmp/mypyc-work/ab-$TAG-$kind-$i.txt | sed "s/^/$kind $i: /" >> /tmp/mypyc-work/ab-$TAG.log
  done
done
echo done >> /tmp/mypyc-work/ab-$TAG.log

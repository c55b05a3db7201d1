package client

import (
	"context"

	"google.golang.org/grpc"

	pb "github.com/m2train/m2train/proto/coordinator/v1"
)

// RegisterWorker records a worker with the coordinator and returns where
// the worker keeps its etcd lease.
func (c *Client) RegisterWorker(ctx context.Context, req *pb.RegisterWorkerRequest) (*pb.RegisterWorkerResponse, error) {
	var out *pb.RegisterWorkerResponse
	err := c.Do(ctx, func(ctx context.Context, cc grpc.ClientConnInterface) error {
		var err error
		out, err = pb.NewWorkerServiceClient(cc).RegisterWorker(ctx, req)
		return err
	})
	return out, err
}

// GetAssignment returns the ranks placed on a worker (none when idle).
func (c *Client) GetAssignment(ctx context.Context, workerID string) ([]*pb.RankAssignment, error) {
	var out []*pb.RankAssignment
	err := c.Do(ctx, func(ctx context.Context, cc grpc.ClientConnInterface) error {
		r, err := pb.NewWorkerServiceClient(cc).GetAssignment(ctx, &pb.GetAssignmentRequest{WorkerId: workerID})
		out = r.GetAssignments()
		return err
	})
	return out, err
}

// ReportProgress reports a rank's progress; the answer says whether the
// rank must stop (stale generation or ended job).
func (c *Client) ReportProgress(ctx context.Context, req *pb.ReportProgressRequest) (stop bool, err error) {
	err = c.Do(ctx, func(ctx context.Context, cc grpc.ClientConnInterface) error {
		r, err := pb.NewWorkerServiceClient(cc).ReportProgress(ctx, req)
		stop = r.GetStop()
		return err
	})
	return stop, err
}

// ReportCheckpoint commits a checkpoint whose manifest is written.
func (c *Client) ReportCheckpoint(ctx context.Context, req *pb.ReportCheckpointRequest) error {
	return c.Do(ctx, func(ctx context.Context, cc grpc.ClientConnInterface) error {
		_, err := pb.NewWorkerServiceClient(cc).ReportCheckpoint(ctx, req)
		return err
	})
}

// ReportFailure ends the current generation of a job because a rank failed.
func (c *Client) ReportFailure(ctx context.Context, req *pb.ReportFailureRequest) error {
	return c.Do(ctx, func(ctx context.Context, cc grpc.ClientConnInterface) error {
		_, err := pb.NewWorkerServiceClient(cc).ReportFailure(ctx, req)
		return err
	})
}

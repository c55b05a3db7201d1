package server

import (
	"context"
	"errors"
	"fmt"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/m2train/m2train/coordinator/fsm"
	"github.com/m2train/m2train/coordinator/jobspec"
	pb "github.com/m2train/m2train/proto/coordinator/v1"
)

// propose commits a command on the leader and returns its result, mapping
// both proposal and state-machine errors to statuses.
func (s *Server) propose(ctx context.Context, c fsm.Command) (*fsm.Result, error) {
	r, err := s.node.Propose(ctx, c)
	if err != nil {
		return nil, s.status(err)
	}
	if r.Err != nil {
		return r, s.status(r.Err)
	}
	return r, nil
}

func (s *Server) getJob(id string) (*pb.Job, error) {
	j, ok := s.node.FSM().Job(id)
	if !ok {
		return nil, s.status(fmt.Errorf("%w: job %q", fsm.ErrNotFound, id))
	}
	return s.jobPB(j), nil
}

// SubmitJob implements pb.JobServiceServer.
func (s *Server) SubmitJob(ctx context.Context, req *pb.SubmitJobRequest) (*pb.SubmitJobResponse, error) {
	if len(req.GetSpecYaml()) > jobspec.MaxSpecBytes {
		return nil, s.status(fmt.Errorf("%w: spec of %d bytes exceeds the limit of %d", jobspec.ErrMalformed, len(req.GetSpecYaml()), jobspec.MaxSpecBytes))
	}
	spec, err := jobspec.Parse(req.GetSpecYaml())
	if err != nil {
		return nil, s.status(err)
	}
	r, err := s.propose(ctx, &fsm.SubmitJob{At: now(), RequestID: req.GetRequestId(), Spec: spec})
	if err != nil {
		return nil, err
	}
	j, err := s.getJob(r.JobID)
	if err != nil {
		return nil, err
	}
	s.log.Info("job submitted", "job", r.JobID)
	return &pb.SubmitJobResponse{Job: j}, nil
}

// GetJob implements pb.JobServiceServer.
func (s *Server) GetJob(_ context.Context, req *pb.GetJobRequest) (*pb.GetJobResponse, error) {
	if err := s.checkLeader(); err != nil {
		return nil, err
	}
	j, err := s.getJob(req.GetJobId())
	if err != nil {
		return nil, err
	}
	return &pb.GetJobResponse{Job: j}, nil
}

// ListJobs implements pb.JobServiceServer.
func (s *Server) ListJobs(_ context.Context, req *pb.ListJobsRequest) (*pb.ListJobsResponse, error) {
	if err := s.checkLeader(); err != nil {
		return nil, err
	}
	var states []fsm.JobState
	for _, st := range req.GetStates() {
		fs, ok := stateFromPB(st)
		if !ok {
			return nil, s.status(fmt.Errorf("%w: states: unknown state %v", fsm.ErrInvalid, st))
		}
		states = append(states, fs)
	}
	out := &pb.ListJobsResponse{}
	for _, j := range s.node.FSM().Jobs(states...) {
		out.Jobs = append(out.Jobs, s.jobPB(j))
	}
	return out, nil
}

// WatchJob implements pb.JobServiceServer: it sends the job at once and after
// each change, and ends after a terminal state. When this replica stops
// leading, the stream ends with a NotLeader status and the client resumes on
// the new leader.
func (s *Server) WatchJob(req *pb.WatchJobRequest, stream pb.JobService_WatchJobServer) error {
	ctx := stream.Context()
	leaderCheck := time.NewTicker(250 * time.Millisecond)
	defer leaderCheck.Stop()
	var last *pb.Job
	for {
		if err := s.checkLeader(); err != nil {
			return err
		}
		changed, _ := s.node.FSM().Changed()
		j, err := s.getJob(req.GetJobId())
		if err != nil {
			return err
		}
		if last == nil || !proto.Equal(last, j) {
			if err := stream.Send(&pb.WatchJobResponse{Job: j}); err != nil {
				return err
			}
			last = j
		}
		if terminal(j.GetState()) {
			return nil
		}
		select {
		case <-ctx.Done():
			return s.status(ctx.Err())
		case <-changed:
		case <-leaderCheck.C:
		}
	}
}

func terminal(s pb.JobState) bool {
	return s == pb.JobState_JOB_STATE_SUCCEEDED || s == pb.JobState_JOB_STATE_FAILED || s == pb.JobState_JOB_STATE_CANCELLED
}

// CancelJob implements pb.JobServiceServer.
func (s *Server) CancelJob(ctx context.Context, req *pb.CancelJobRequest) (*pb.CancelJobResponse, error) {
	if _, err := s.propose(ctx, &fsm.CancelJob{At: now(), JobID: req.GetJobId(), Reason: req.GetReason()}); err != nil {
		return nil, err
	}
	j, err := s.getJob(req.GetJobId())
	if err != nil {
		return nil, err
	}
	return &pb.CancelJobResponse{Job: j}, nil
}

// ListCheckpoints implements pb.JobServiceServer.
func (s *Server) ListCheckpoints(_ context.Context, req *pb.ListCheckpointsRequest) (*pb.ListCheckpointsResponse, error) {
	if err := s.checkLeader(); err != nil {
		return nil, err
	}
	j, ok := s.node.FSM().Job(req.GetJobId())
	if !ok {
		return nil, s.status(fmt.Errorf("%w: job %q", fsm.ErrNotFound, req.GetJobId()))
	}
	out := &pb.ListCheckpointsResponse{}
	for _, c := range j.Checkpoints {
		out.Checkpoints = append(out.Checkpoints, checkpointPB(c))
	}
	return out, nil
}

// ListEvents implements pb.JobServiceServer.
func (s *Server) ListEvents(_ context.Context, req *pb.ListEventsRequest) (*pb.ListEventsResponse, error) {
	if err := s.checkLeader(); err != nil {
		return nil, err
	}
	if id := req.GetJobId(); id != "" {
		if _, ok := s.node.FSM().Job(id); !ok {
			return nil, s.status(fmt.Errorf("%w: job %q", fsm.ErrNotFound, id))
		}
	}
	limit := int(req.GetLimit())
	if limit <= 0 || limit > MaxEventsPerCall {
		limit = MaxEventsPerCall
	}
	out := &pb.ListEventsResponse{}
	for _, e := range s.node.FSM().Events(req.GetJobId(), req.GetAfterSeq(), limit) {
		out.Events = append(out.Events, eventPB(e))
	}
	return out, nil
}

// RegisterWorker implements pb.WorkerServiceServer. It records the worker
// and tells it where to keep its etcd lease; the worker becomes schedulable
// once the leader sees that lease.
func (s *Server) RegisterWorker(ctx context.Context, req *pb.RegisterWorkerRequest) (*pb.RegisterWorkerResponse, error) {
	_, err := s.propose(ctx, &fsm.RegisterWorker{At: now(), WorkerID: req.GetWorkerId(), Addr: req.GetAddr(),
		Hostname: req.GetHostname(), GPUs: int(req.GetGpus())})
	if err != nil {
		return nil, err
	}
	return &pb.RegisterWorkerResponse{EtcdEndpoints: s.cfg.EtcdEndpoints, LeaseTtlSeconds: int64(s.cfg.LeaseTTL)}, nil
}

// GetAssignment implements pb.WorkerServiceServer.
func (s *Server) GetAssignment(_ context.Context, req *pb.GetAssignmentRequest) (*pb.GetAssignmentResponse, error) {
	if err := s.checkLeader(); err != nil {
		return nil, err
	}
	out := &pb.GetAssignmentResponse{}
	for _, ra := range s.node.FSM().WorkerAssignments(req.GetWorkerId()) {
		j, a := ra.Job, ra.Assignment
		pa := &pb.RankAssignment{
			JobId: j.ID, Generation: j.Generation, Rank: int32(a.Rank), DpRank: int32(a.DPRank), SpRank: int32(a.SPRank),
			WorldSize: int32(j.World()), Gpu: int32(a.GPU), SpecYaml: specYAML(j.Spec),
		}
		if ck, ok := j.LastCheckpoint(); ok {
			pa.ResumeFrom = checkpointPB(ck)
		}
		out.Assignments = append(out.Assignments, pa)
	}
	return out, nil
}

// ReportProgress implements pb.WorkerServiceServer. Only rank 0's progress
// goes through raft; other ranks learn whether to stop from the local state.
func (s *Server) ReportProgress(ctx context.Context, req *pb.ReportProgressRequest) (*pb.ReportProgressResponse, error) {
	if req.GetRank() != 0 && !req.GetDone() {
		if err := s.checkLeader(); err != nil {
			return nil, err
		}
		j, ok := s.node.FSM().Job(req.GetJobId())
		if !ok {
			return nil, s.status(fmt.Errorf("%w: job %q", fsm.ErrNotFound, req.GetJobId()))
		}
		return &pb.ReportProgressResponse{Stop: j.State != fsm.JobRunning || j.Generation != req.GetGeneration()}, nil
	}
	r, err := s.node.Propose(ctx, &fsm.ReportProgress{At: now(), JobID: req.GetJobId(), Generation: req.GetGeneration(),
		Rank: int(req.GetRank()), Step: req.GetStep(), Loss: req.GetLoss(), TokensPerSec: req.GetTokensPerSec(),
		GradNorm: req.GetGradNorm(), LR: req.GetLr(), Done: req.GetDone()})
	if err != nil {
		return nil, s.status(err)
	}
	// A stale generation or an ended job is an answer, not an error: the
	// rank stops.
	if errors.Is(r.Err, fsm.ErrStale) {
		return &pb.ReportProgressResponse{Stop: true}, nil
	}
	if r.Err != nil {
		return nil, s.status(r.Err)
	}
	return &pb.ReportProgressResponse{Stop: req.GetDone()}, nil
}

// ReportCheckpoint implements pb.WorkerServiceServer.
func (s *Server) ReportCheckpoint(ctx context.Context, req *pb.ReportCheckpointRequest) (*pb.ReportCheckpointResponse, error) {
	_, err := s.propose(ctx, &fsm.CommitCheckpoint{At: now(), JobID: req.GetJobId(), Generation: req.GetGeneration(),
		Step: req.GetStep(), Location: req.GetLocation()})
	if err != nil {
		return nil, err
	}
	return &pb.ReportCheckpointResponse{}, nil
}

// ReportFailure implements pb.WorkerServiceServer.
func (s *Server) ReportFailure(ctx context.Context, req *pb.ReportFailureRequest) (*pb.ReportFailureResponse, error) {
	_, err := s.propose(ctx, &fsm.ReportFailure{At: now(), JobID: req.GetJobId(), Generation: req.GetGeneration(),
		Rank: int(req.GetRank()), WorkerID: req.GetWorkerId(), Message: req.GetMessage(), Fatal: req.GetFatal()})
	if err != nil {
		return nil, err
	}
	return &pb.ReportFailureResponse{}, nil
}
